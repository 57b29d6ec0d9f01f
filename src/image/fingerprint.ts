/**
 * An image's fingerprint: sha256 over a canonical rendering of everything that decides its
 * bytes (package versions, init script text, host binaries copied in, builder version). Same
 * inputs, same fingerprint, same cache directory.
 */
import { createHash } from "node:crypto";

/** Bump when the builder changes how it assembles images in a way the inputs do not capture. */
export const BUILDER_VERSION = 3;

export type FingerprintInput =
  | string
  | number
  | boolean
  | null
  | FingerprintInput[]
  | { [k: string]: FingerprintInput };

/** JSON with object keys sorted, so key order never changes the fingerprint. */
export function canonicalJson(value: FingerprintInput): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k]!)}`).join(",")}}`;
}

/** Hex sha256 of the canonical inputs, builder version included. 64 hex chars. */
export function computeFingerprint(inputs: { [k: string]: FingerprintInput }): string {
  return createHash("sha256")
    .update(canonicalJson({ builderVersion: BUILDER_VERSION, ...inputs }))
    .digest("hex");
}

/** The short form used in directory names. */
export function shortFingerprint(fp: string): string {
  return fp.slice(0, 16);
}
