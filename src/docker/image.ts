import { createHash } from 'node:crypto';
import { posix } from 'node:path';
import { InputError } from '../errors.js';

/**
 * Image metadata as plain values: the OCI/Docker image config, manifest and index, built the way
 * crane builds them (no daemon), and `--change` instructions applied the way `docker import
 * --change` applies them.
 */

export type Architecture = 'amd64' | '386';

/** An empty JSON object, the value type of Docker's set-like maps (ExposedPorts, Volumes). */
export type EmptyObject = Record<string, never>;

/** The `config` member of an image config, with Docker's field names. */
export interface ContainerConfig {
  Cmd?: string[];
  Entrypoint?: string[];
  Env?: string[];
  Labels?: Record<string, string>;
  WorkingDir?: string;
  User?: string;
  ExposedPorts?: Record<string, EmptyObject>;
  Volumes?: Record<string, EmptyObject>;
}

export interface HistoryEntry {
  created?: string;
  created_by?: string;
  author?: string;
  comment?: string;
  empty_layer?: boolean;
}

export interface ImageConfigInput {
  /** RFC 3339; default: SOURCE_DATE_EPOCH when set, else the epoch, so equal input gives an equal digest. */
  created?: string;
  architecture: Architecture;
  os: 'linux';
  /** sha256:… of the uncompressed layer tar. */
  diffId: string;
  config: ContainerConfig;
  history?: HistoryEntry[];
}

export interface ImageConfig {
  architecture: Architecture;
  config: ContainerConfig;
  created: string;
  history: HistoryEntry[];
  os: 'linux';
  rootfs: { type: 'layers'; diff_ids: string[] };
}

/** What an output needs besides the layer: the config input without the diffID, and a tag. */
export interface ImageMeta {
  architecture: Architecture;
  os?: 'linux';
  created?: string;
  config: ContainerConfig;
  history?: HistoryEntry[];
  /** repo[:tag]; the tag defaults to "latest". */
  tag?: string;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { architecture: string; os: string };
}

export const MEDIA_TYPES = {
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  index: 'application/vnd.oci.image.index.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layer: 'application/vnd.oci.image.layer.v1.tar',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

const DIGEST = /^sha256:[0-9a-f]{64}$/;

/** JSON with object keys sorted at every level, so equal values always give equal bytes. */
export function canonicalJson(value: unknown): Buffer {
  const sort = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sort);
    if (v !== null && typeof v === 'object') {
      const out: Record<string, unknown> = {};
      for (const k of Object.keys(v).sort()) {
        const x = (v as Record<string, unknown>)[k];
        if (x !== undefined) out[k] = sort(x);
      }
      return out;
    }
    return v;
  };
  return Buffer.from(JSON.stringify(sort(value)));
}

export function sha256Digest(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** A blob and its descriptor. */
export function blob(mediaType: string, value: unknown): { bytes: Buffer; descriptor: Descriptor } {
  const bytes = canonicalJson(value);
  return { bytes, descriptor: { mediaType, digest: sha256Digest(bytes), size: bytes.length } };
}

/** SOURCE_DATE_EPOCH (reproducible-builds.org) as RFC 3339, or the epoch when unset. */
export function defaultCreated(env: Record<string, string | undefined> = process.env): string {
  const raw = env.SOURCE_DATE_EPOCH;
  if (raw === undefined || raw === '') return '1970-01-01T00:00:00Z';
  if (!/^\d{1,12}$/.test(raw)) throw new InputError('SOURCE_DATE_EPOCH', `not a number of seconds: ${JSON.stringify(raw)}`);
  return new Date(Number(raw) * 1000).toISOString().replace('.000Z', 'Z');
}

/** The given creation time, checked, or the reproducible default. */
export function resolveCreated(created: string | undefined): string {
  const value = created ?? defaultCreated();
  if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$/.test(value) || Number.isNaN(Date.parse(value))) {
    throw new InputError('created', `not an RFC 3339 time: ${JSON.stringify(value)}`);
  }
  return value;
}

export function imageConfig(input: ImageConfigInput): ImageConfig {
  if (!DIGEST.test(input.diffId)) throw new Error(`not a sha256 diffID: ${input.diffId}`);
  const created = resolveCreated(input.created);
  const history = input.history ?? [{ created, created_by: 'ddk2docker', comment: 'root file system of a XenServer DDK' }];
  // Tools pair history entries that are not empty_layer with layers; a mismatch confuses them.
  if (history.filter((h) => !h.empty_layer).length !== 1) throw new Error('image history must have exactly one entry for the one layer');
  return {
    architecture: input.architecture,
    config: input.config,
    created,
    history,
    os: input.os,
    rootfs: { type: 'layers', diff_ids: [input.diffId] },
  };
}

export function imageManifest(config: Descriptor, layers: Descriptor[]): unknown {
  return { schemaVersion: 2, mediaType: MEDIA_TYPES.manifest, config, layers };
}

export function imageIndex(manifests: Descriptor[]): unknown {
  return { schemaVersion: 2, mediaType: MEDIA_TYPES.index, manifests };
}

export interface ImageTag {
  /** The repository as given, e.g. "ddk" or "registry:5000/x/ddk". */
  repository: string;
  tag: string;
  /** The fully qualified name containerd uses, e.g. "docker.io/library/ddk:8.2". */
  fullName: string;
}

const COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*';
const DOMAIN = '(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)';
const REPOSITORY = new RegExp(`^(?:${DOMAIN}/)?${COMPONENT}(?:/${COMPONENT})*$`);
const TAG = /^[\w][\w.-]{0,127}$/;

/** Parse `repo[:tag]` (Docker's reference grammar, no digests). */
export function parseTag(ref: string): ImageTag {
  const slash = ref.lastIndexOf('/');
  const colon = ref.lastIndexOf(':');
  const [repository, tag] = colon > slash ? [ref.slice(0, colon), ref.slice(colon + 1)] : [ref, 'latest'];
  if (ref.includes('@')) throw new InputError(`tag ${JSON.stringify(ref)}`, 'a digest reference cannot name an image being written');
  if (!REPOSITORY.test(repository) || repository.length > 255) throw new InputError(`tag ${JSON.stringify(ref)}`, 'not a valid repository name (lowercase letters, digits and separators, optionally a registry host first)');
  if (!TAG.test(tag)) throw new InputError(`tag ${JSON.stringify(ref)}`, 'not a valid tag (letters, digits, "_", "." and "-", at most 128)');
  const first = repository.split('/')[0]!;
  const hasDomain = repository.includes('/') && (first.includes('.') || first.includes(':') || first === 'localhost' || first !== first.toLowerCase());
  const fullName = hasDomain ? repository : repository.includes('/') ? `docker.io/${repository}` : `docker.io/library/${repository}`;
  return { repository, tag, fullName: `${fullName}:${tag}` };
}

// --- --change: Dockerfile instructions as `docker import --change` accepts them ---

const SUPPORTED = ['CMD', 'ENTRYPOINT', 'ENV', 'EXPOSE', 'LABEL', 'USER', 'VOLUME', 'WORKDIR'];

class ChangeError extends InputError {
  constructor(change: string, problem: string) {
    super(`--change ${JSON.stringify(change)}`, problem);
  }
}

/** Split at unquoted, unescaped whitespace; quotes and escapes stay in the words for processWord. */
function splitRawWords(s: string, change: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  let quote = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (quote) {
      word += c;
      if (c === '\\' && quote === '"' && i + 1 < s.length) word += s[++i];
      else if (c === quote) quote = '';
      continue;
    }
    if (/\s/.test(c)) {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
      continue;
    }
    inWord = true;
    word += c;
    if (c === '\\' && i + 1 < s.length) word += s[++i];
    else if (c === '"' || c === "'") quote = c;
  }
  if (quote) throw new ChangeError(change, `unmatched ${quote}`);
  if (inWord) words.push(word);
  return words;
}

/** Remove quotes and escapes and substitute $VAR, ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:+x}, ${VAR+x}. */
function processWord(word: string, env: Map<string, string>, change: string): string {
  let out = '';
  let i = 0;
  const substitute = (): void => {
    // word[i] is "$"
    if (word[i + 1] === '{') {
      let depth = 1;
      let j = i + 2;
      for (; j < word.length && depth > 0; j++) {
        if (word[j] === '\\') j++;
        else if (word[j] === '{') depth++;
        else if (word[j] === '}') depth--;
      }
      if (depth > 0) throw new ChangeError(change, `missing "}" in ${word.slice(i)}`);
      const inner = word.slice(i + 2, j - 1);
      const m = /^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])([\s\S]*))?$/.exec(inner);
      if (!m) throw new ChangeError(change, `unsupported substitution \${${inner}}`);
      const [, name, op, alt] = m;
      const value = env.get(name!);
      const set = op?.startsWith(':') ? value !== undefined && value !== '' : value !== undefined;
      if (op === undefined) out += value ?? '';
      else if (op.endsWith('-')) out += set ? value : processWord(alt!, env, change);
      else out += set ? processWord(alt!, env, change) : '';
      i = j;
      return;
    }
    const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(word.slice(i + 1));
    if (!m) {
      out += '$';
      i++;
      return;
    }
    out += env.get(m[0]) ?? '';
    i += 1 + m[0].length;
  };
  while (i < word.length) {
    const c = word[i]!;
    if (c === "'") {
      const end = word.indexOf("'", i + 1);
      if (end === -1) throw new ChangeError(change, "unmatched '");
      out += word.slice(i + 1, end);
      i = end + 1;
    } else if (c === '"') {
      i++;
      for (;;) {
        if (i >= word.length) throw new ChangeError(change, 'unmatched "');
        const d = word[i]!;
        if (d === '"') {
          i++;
          break;
        }
        if (d === '\\' && '"\\$'.includes(word[i + 1] ?? 'x')) {
          out += word[i + 1];
          i += 2;
        } else if (d === '$') substitute();
        else {
          out += d;
          i++;
        }
      }
    } else if (c === '\\' && i + 1 < word.length) {
      out += word[i + 1];
      i += 2;
    } else if (c === '$') substitute();
    else {
      out += c;
      i++;
    }
  }
  return out;
}

/** `[ "a", "b" ]` → the strings; anything else → undefined (Docker then takes the shell form). */
function jsonList(rest: string): string[] | undefined {
  if (!rest.startsWith('[')) return undefined;
  try {
    const v: unknown = JSON.parse(rest);
    return Array.isArray(v) && v.every((x) => typeof x === 'string') ? v : undefined;
  } catch {
    return undefined;
  }
}

/** `K=V K2="V 2"` or the legacy `K V…`; keys and values substituted against `env`. */
function nameValues(instruction: string, rest: string, env: Map<string, string>, change: string): [string, string][] {
  const words = splitRawWords(rest, change);
  if (words.length === 0) throw new ChangeError(change, `${instruction} needs at least one name=value`);
  let pairs: [string, string][];
  if (!words[0]!.includes('=')) {
    const m = /^(\S+)\s+(\S[\s\S]*)$/.exec(rest);
    if (!m) throw new ChangeError(change, `${instruction} needs a name and a value`);
    pairs = [[m[1]!, m[2]!]];
  } else {
    pairs = words.map((w) => {
      const eq = w.indexOf('=');
      if (eq === -1) throw new ChangeError(change, `no "=" in ${JSON.stringify(w)}: ${instruction} takes name=value pairs`);
      return [w.slice(0, eq), w.slice(eq + 1)];
    });
  }
  return pairs.map(([k, v]) => {
    const key = processWord(k, env, change);
    if (key === '') throw new ChangeError(change, `${instruction} name cannot be empty`);
    return [key, processWord(v, env, change)];
  });
}

function ports(words: string[], change: string): string[] {
  const out: string[] = [];
  for (const w of words) {
    const m = /^(\d{1,5})(?:-(\d{1,5}))?(?:\/(tcp|udp|sctp))?$/i.exec(w);
    const lo = Number(m?.[1]);
    const hi = m?.[2] === undefined ? lo : Number(m[2]);
    if (!m || lo < 1 || hi > 65535 || hi < lo) throw new ChangeError(change, `invalid port ${JSON.stringify(w)}: expected PORT[-PORT][/tcp|udp|sctp]`);
    for (let p = lo; p <= hi; p++) out.push(`${p}/${(m[3] ?? 'tcp').toLowerCase()}`);
  }
  return out;
}

function envMap(env: readonly string[] | undefined): Map<string, string> {
  const m = new Map<string, string>();
  for (const e of env ?? []) {
    const eq = e.indexOf('=');
    if (eq === -1) m.set(e, '');
    else m.set(e.slice(0, eq), e.slice(eq + 1));
  }
  return m;
}

/**
 * Apply Dockerfile-style instructions to a container config, returning a new config; the input
 * is not modified. Semantics follow `docker import --change`: variables are substituted from the
 * Env in effect before each instruction (not in CMD/ENTRYPOINT), a shell-form CMD/ENTRYPOINT runs
 * under /bin/sh -c, ENTRYPOINT clears a Cmd not set by an earlier CMD in the same list, and a
 * relative WORKDIR is joined to the current one.
 */
export function applyChanges(config: ContainerConfig, changes: readonly string[]): ContainerConfig {
  const out: ContainerConfig = structuredClone(config);
  let cmdSet = false;
  for (const change of changes) {
    const line = change.replace(/\\\r?\n/g, '').trim();
    const m = /^(\S+)(?:\s+([\s\S]*))?$/.exec(line);
    if (!m) throw new ChangeError(change, `empty instruction; expected one of ${SUPPORTED.join(', ')}`);
    const instruction = m[1]!.toUpperCase();
    const rest = (m[2] ?? '').trim();
    const env = envMap(out.Env);
    const words = (): string[] => splitRawWords(rest, change).map((w) => processWord(w, env, change));
    const needArgs = (): void => {
      if (rest === '') throw new ChangeError(change, `${instruction} needs an argument`);
    };
    switch (instruction) {
      case 'CMD':
      case 'ENTRYPOINT': {
        needArgs();
        const argv = jsonList(rest) ?? ['/bin/sh', '-c', rest];
        if (instruction === 'CMD') {
          out.Cmd = argv;
          cmdSet = true;
        } else {
          out.Entrypoint = argv;
          if (!cmdSet) delete out.Cmd;
        }
        break;
      }
      case 'ENV': {
        const list = [...(out.Env ?? [])];
        for (const [k, v] of nameValues(instruction, rest, env, change)) {
          const at = list.findIndex((e) => e === k || e.startsWith(`${k}=`));
          if (at === -1) list.push(`${k}=${v}`);
          else list[at] = `${k}=${v}`;
        }
        out.Env = list;
        break;
      }
      case 'LABEL':
        out.Labels = { ...out.Labels, ...Object.fromEntries(nameValues(instruction, rest, env, change)) };
        break;
      case 'EXPOSE': {
        needArgs();
        const exposed = { ...out.ExposedPorts };
        for (const p of ports(words(), change)) exposed[p] = {};
        out.ExposedPorts = exposed;
        break;
      }
      case 'USER':
        needArgs();
        out.User = processWord(rest, env, change);
        break;
      case 'VOLUME': {
        needArgs();
        const list = jsonList(rest)?.map((v) => processWord(v, env, change)) ?? words();
        const volumes = { ...out.Volumes };
        for (const v of list) {
          if (v.trim() === '') throw new ChangeError(change, 'VOLUME cannot be an empty string');
          volumes[v.trim()] = {};
        }
        out.Volumes = volumes;
        break;
      }
      case 'WORKDIR': {
        needArgs();
        const dir = processWord(rest, env, change);
        if (dir === '') throw new ChangeError(change, 'WORKDIR cannot be empty');
        out.WorkingDir = dir.startsWith('/') ? dir : posix.join('/', out.WorkingDir ?? '', dir);
        break;
      }
      case 'ONBUILD':
        throw new ChangeError(change, 'ONBUILD is not supported: an OCI image config has no build triggers');
      default:
        throw new ChangeError(change, `unknown or unsupported instruction ${instruction}; expected one of ${SUPPORTED.join(', ')}`);
    }
  }
  return out;
}
