import http from 'node:http';
import https from 'node:https';
import { formatXml } from '@vates/xml/format';
import { parseXml } from '@vates/xml/parse';
import { XMLValidator } from 'fast-xml-parser';
import { xmlRpcFormatter } from '@vates/xml-rpc/formatter';
import { xmlRpcParser } from '@vates/xml-rpc/parser';
import { CancelledError } from '../errors.js';

/**
 * A failure talking to XAPI. `code` is XAPI's error code (`SESSION_AUTHENTICATION_FAILED`,
 * `UUID_INVALID`, …) or one of ours: `UNREACHABLE`, `TLS`, `PROTOCOL`, `CREDENTIALS`, `URL`,
 * `UNEXPECTED_RESULT`, `NOT_REGISTERED`, `NOT_MONITORED_YET`, `MONITOR_TIMEOUT`,
 * `INVALID_ARGUMENT`. `message` is one line
 * meant for the user; it never holds the password.
 */
export class XapiError extends Error {
  readonly code: string;
  readonly params: readonly string[];
  readonly url: string;
  constructor(code: string, url: string, message: string, params: readonly string[] = []) {
    super(message);
    this.name = 'XapiError';
    this.code = code;
    this.url = url;
    this.params = params;
  }
}

/** Where and how to send calls: one keep-alive agent per session, so TLS settings stay together. */
export interface RpcEndpoint {
  url: URL;
  /** The URL as shown to users: no credentials, no trailing slash. */
  display: string;
  agent: http.Agent;
  timeoutMs: number;
}

const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;

// Node's codes for a certificate it does not trust; each deserves the same advice.
const CERTIFICATE_ERRORS = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'CERT_SIGNATURE_FAILURE',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

export function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, ' ').trim();
}

export function displayUrl(url: URL): string {
  const path = url.pathname === '/' ? '' : url.pathname;
  return `${url.protocol}//${url.host}${path}`;
}

function transportError(endpoint: RpcEndpoint, error: NodeJS.ErrnoException): Error {
  const where = endpoint.display;
  const code = error.code ?? '';
  if (CERTIFICATE_ERRORS.has(code)) {
    return new XapiError(
      'TLS',
      where,
      `cannot verify the TLS certificate of XAPI at ${where}: ${error.message} ` +
        '(give its CA certificate with --xapi-ca FILE, or accept any certificate with --insecure)',
    );
  }
  if (code.startsWith('ERR_SSL') || code === 'EPROTO' || code.startsWith('ERR_TLS')) {
    // OpenSSL's message carries its source file and line; its reason alone is what users can act on.
    const reason = /:error:[0-9A-F]+:[^:]*:[^:]*:([^:]+):/.exec(error.message)?.[1];
    const detail = reason ?? error.message;
    return new XapiError('TLS', where, `TLS with XAPI at ${where} failed: ${oneLine(detail)}`);
  }
  return new XapiError('UNREACHABLE', where, `cannot reach XAPI at ${where}: ${oneLine(error.message)}`);
}

function post(endpoint: RpcEndpoint, body: string, signal: AbortSignal | undefined): Promise<string> {
  const client = endpoint.url.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const request = client.request(endpoint.url, {
      method: 'POST',
      agent: endpoint.agent,
      signal,
      headers: { 'content-type': 'text/xml', 'content-length': Buffer.byteLength(body) },
    });
    request.setTimeout(endpoint.timeoutMs, () => {
      request.destroy(
        new XapiError(
          'UNREACHABLE',
          endpoint.display,
          `XAPI at ${endpoint.display} did not answer within ${endpoint.timeoutMs / 1000} s`,
        ),
      );
    });
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (error.name === 'AbortError' || signal?.aborted) reject(new CancelledError());
      else if (error instanceof XapiError) reject(error);
      else reject(transportError(endpoint, error));
    });
    request.on('response', (response) => {
      const status = response.statusCode ?? 0;
      if (status < 200 || status > 299) {
        response.resume();
        reject(
          new XapiError(
            'PROTOCOL',
            endpoint.display,
            `XAPI at ${endpoint.display} answered HTTP ${status} ${response.statusMessage ?? ''}`.trimEnd(),
          ),
        );
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      response.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_RESPONSE_BYTES) {
          request.destroy(
            new XapiError('PROTOCOL', endpoint.display, `XAPI at ${endpoint.display} sent an oversized response`),
          );
          return;
        }
        chunks.push(chunk);
      });
      response.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      response.on('error', (error) => request.destroy(error));
    });
    request.end(body);
  });
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * One XML-RPC call in XAPI's envelope: resolves to `Value` when `Status` is "Success" and
 * throws an XapiError carrying `ErrorDescription` otherwise. Callers map the codes they expect to
 * friendlier messages.
 */
export async function xmlRpcCall(
  endpoint: RpcEndpoint,
  method: string,
  params: unknown[],
  signal?: AbortSignal,
): Promise<unknown> {
  const body = formatXml(xmlRpcFormatter.format_methodCall({ methodName: method, params }), { indent: 0 });
  const text = await post(endpoint, body, signal);
  let response: unknown;
  try {
    // A linear validator first: sax (under @vates/xml) takes quadratic time on some malformed replies.
    const valid = XMLValidator.validate(text);
    if (valid !== true) throw new Error(`malformed XML at line ${valid.err.line}, column ${valid.err.col}: ${valid.err.msg}`);
    // Whitespace inside values is data (other_config holds XML documents): keep it as sent.
    response = xmlRpcParser.parse(parseXml(text, { normalize: false, trim: false }));
  } catch (error) {
    throw new XapiError(
      'PROTOCOL',
      endpoint.display,
      `XAPI at ${endpoint.display} sent a reply to ${method} that is not XML-RPC (${(error as Error).message.split('\n')[0]})`,
    );
  }
  if (isRecord(response) && response.fault !== undefined) {
    const fault = isRecord(response.fault) ? response.fault : {};
    throw new XapiError(
      'PROTOCOL',
      endpoint.display,
      `XAPI at ${endpoint.display} sent an XML-RPC fault for ${method}: ${String(fault.faultString ?? 'unknown')}`,
    );
  }
  const result = isRecord(response) && Array.isArray(response.params) ? response.params[0] : undefined;
  if (!isRecord(result) || (result.Status !== 'Success' && result.Status !== 'Failure')) {
    throw new XapiError(
      'PROTOCOL',
      endpoint.display,
      `XAPI at ${endpoint.display} sent a reply to ${method} without XAPI's Status field`,
    );
  }
  if (result.Status === 'Success') return result.Value;
  const description = Array.isArray(result.ErrorDescription) ? result.ErrorDescription.map(String) : [];
  const [code = 'UNKNOWN_ERROR', ...rest] = description;
  throw new XapiError(code, endpoint.display, `${code}(${rest.join(', ')})`, rest);
}
