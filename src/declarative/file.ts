import { readFile } from 'node:fs/promises';
import { basename, dirname, extname, resolve } from 'node:path';
import { isMap, isNode, isScalar, LineCounter, parseDocument, type Document } from 'yaml';
import { z } from 'zod';
import { applyChanges, parseTag } from '../docker/image.js';
import { parseOutput } from '../docker/outputs.js';
import { InputError } from '../errors.js';
import { isUrl } from '../pipeline/fetch.js';

/**
 * A pipeline file (pipelines/*.yaml): one DDK release, converted the way `ddk2docker convert`
 * would with the same options. Unknown keys are errors, so a misspelt field never passes silently.
 */
const checked = (check: (value: string) => unknown) => (value: string, ctx: z.RefinementCtx) => {
  try {
    check(value);
  } catch (err) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
  }
};

const PARTITION = 'a partition number (1, 2, …) or auto';

export const PipelineFileSchema = z
  .object({
    name: z.string().min(1).regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'letters, digits, ".", "_" and "-" only').optional(),
    source: z
      .string()
      .min(1)
      .refine((s) => isUrl(s) || !/^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(s), 'only http(s) URLs and file paths are fetched'),
    sha256: z
      .string()
      .regex(/^(sha256:)?[0-9a-fA-F]{64}$/, 'not a sha256 (64 hex digits)')
      .transform((s) => s.toLowerCase().replace(/^sha256:/, ''))
      .optional(),
    tag: z.string().min(1).superRefine(checked(parseTag)).optional(),
    labels: z
      .record(
        z.string().min(1, 'a label needs a key'),
        // YAML reads 6.10 as the number 6.1: a label value must be written as a string.
        z.string({ invalid_type_error: 'a label value must be a string: quote it (unquoted 6.10 is the number 6.1)' }),
      )
      .default({}),
    changes: z.array(z.string().superRefine(checked((c) => applyChanges({}, [c])))).default([]),
    smoke: z.string().min(1).optional(),
    unameShim: z.boolean().default(false),
    engine: z.enum(['builtin', 'host']).default('builtin'),
    output: z.string().min(1).superRefine(checked(parseOutput)).default('docker'),
    // REGISTRY/REPO:TAG parses as a tag does (the push stage's parser builds on parseTag).
    push: z.string().min(1).superRefine(checked(parseTag)).optional(),
    partition: z
      .union([z.literal('auto'), z.number().int(PARTITION).min(1, PARTITION)], { errorMap: () => ({ message: PARTITION }) })
      .default('auto'),
  })
  .strict();

export type PipelineFileFields = z.infer<typeof PipelineFileSchema>;

/** A loaded pipeline: its fields with paths resolved against the file's directory. */
export interface PipelineSpec extends Omit<PipelineFileFields, 'name'> {
  name: string;
  /** The file as given on the command line. */
  file: string;
}

/** Output targets name a path after the kind (`oci:DIR`): resolve it like the source. */
function resolveOutput(output: string, dir: string): string {
  const colon = output.indexOf(':');
  return colon === -1 ? output : `${output.slice(0, colon)}:${resolve(dir, output.slice(colon + 1))}`;
}

function describePath(path: (string | number)[]): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += /^[A-Za-z_][A-Za-z0-9_-]*$/.test(p) ? `${out ? '.' : ''}${p}` : `[${JSON.stringify(p)}]`;
  }
  return out;
}

/** Where a field is in the file: its value, or for an unknown key the key itself. */
function lineOf(doc: Document, lines: LineCounter, path: (string | number)[], key?: string): number {
  for (let depth = path.length; depth >= 0; depth--) {
    const node = depth === 0 ? doc.contents : doc.getIn(path.slice(0, depth), true);
    if (!isNode(node) || !node.range) continue;
    if (key !== undefined && depth === path.length && isMap(node)) {
      const pair = node.items.find((p) => isScalar(p.key) && p.key.value === key);
      if (pair && isScalar(pair.key) && pair.key.range) return lines.linePos(pair.key.range[0]).line;
    }
    return lines.linePos(node.range[0]).line;
  }
  return 1;
}

function describeIssue(issue: z.ZodIssue, doc: Document, lines: LineCounter): string[] {
  if (issue.code === z.ZodIssueCode.unrecognized_keys) {
    return issue.keys.map((key) => {
      const where = describePath([...issue.path, key]);
      return `line ${lineOf(doc, lines, issue.path, key)}: ${where}: unknown field (known: ${Object.keys(PipelineFileSchema.shape).join(', ')})`;
    });
  }
  const where = issue.path.length ? `${describePath(issue.path)}: ` : '';
  const message = issue.code === z.ZodIssueCode.invalid_type && issue.received === 'undefined' ? 'required' : issue.code === z.ZodIssueCode.invalid_type && issue.path.length === 0 ? `expected a mapping of pipeline fields, got ${issue.received}` : issue.message;
  return [`line ${lineOf(doc, lines, issue.path)}: ${where}${message}`];
}

/** Parse and check a pipeline file's text; `file` names it in errors and anchors relative paths. */
export function parsePipeline(file: string, text: string): PipelineSpec {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length) {
    throw new InputError(file, doc.errors.map((e) => `line ${e.linePos?.[0].line ?? '?'}: ${e.message.split('\n')[0]!.replace(/ at line \d+, column \d+:?$/, '')}`).join('; '));
  }
  const parsed = PipelineFileSchema.safeParse(doc.toJS());
  if (!parsed.success) throw new InputError(file, parsed.error.issues.flatMap((i) => describeIssue(i, doc, lines)).join('; '));
  const dir = dirname(resolve(file));
  const { name, ...fields } = parsed.data;
  return {
    ...fields,
    name: name ?? basename(file, extname(file)),
    file,
    source: isUrl(fields.source) ? fields.source : resolve(dir, fields.source),
    output: resolveOutput(fields.output, dir),
  };
}

export async function loadPipeline(file: string): Promise<PipelineSpec> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new InputError(file, code === 'ENOENT' ? 'no such file' : (err as Error).message, { cause: err });
  }
  return parsePipeline(file, text);
}

/**
 * Load every file before anything runs, so a typo in the last one is found before the first
 * conversion has spent minutes; pipelines that would write the same tag or output are refused.
 */
export async function loadPipelines(files: string[]): Promise<PipelineSpec[]> {
  const results = await Promise.allSettled(files.map((f) => loadPipeline(f)));
  const errors = results.flatMap((r) => (r.status === 'rejected' ? [r.reason as Error] : []));
  if (errors.length === 1) throw errors[0];
  if (errors.length) throw new InputError(`${errors.length} pipeline files`, errors.map((e) => e.message).join(' | '));
  const specs = results.map((r) => (r as PromiseFulfilledResult<PipelineSpec>).value);
  const seen = new Map<string, string>();
  for (const s of specs) {
    for (const key of [`name ${s.name}`, ...(s.tag ? [`tag ${s.tag}`] : []), ...(s.output !== 'docker' ? [`output ${s.output}`] : []), ...(s.push ? [`push ${s.push}`] : [])]) {
      const other = seen.get(key);
      if (other) throw new InputError(s.file, `${key} is also used by ${other}; running both would overwrite one with the other`);
      seen.set(key, s.file);
    }
  }
  return specs;
}
