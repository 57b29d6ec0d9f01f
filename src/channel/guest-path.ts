/**
 * Guest path rules shared by every channel (the agent enforces the same ones itself): absolute,
 * normalized, naming a file. Checked on the host first so a bad path is a clear ValidationError
 * before anything reaches the guest, whichever transport carries the call.
 */
import { ValidationError } from "../errors.js";

/** What is wrong with `path` as a guest path, or undefined when it is acceptable. */
export function guestPathProblem(path: string): string | undefined {
  if (typeof path !== "string" || !path.startsWith("/")) return "must be absolute (start with /)";
  if (path.includes("\0")) return "contains a NUL byte";
  if (Buffer.byteLength(path) > 4096) return "is longer than 4096 bytes";
  if (path.split("/").some((c) => c === ".." || c === ".")) return 'has a "." or ".." component';
  if (path.endsWith("/")) return "ends with / (name the file)";
  return undefined;
}

/** Both channels accept the same guest paths: absolute, normalized, naming a file. */
export function validateGuestPath(path: string): void {
  const problem = guestPathProblem(path);
  if (problem) {
    throw new ValidationError(`guest path ${JSON.stringify(String(path).slice(0, 200))} ${problem}.`, {
      details: { problem },
    });
  }
}
