/**
 * The one port-range check of the package: an integer in 1..65535, or 0 where the caller lets
 * the kernel pick ("allowZero"). Every option or argument that names a TCP port goes through it.
 */
import { ValidationError } from "../errors.js";

export const MAX_PORT = 65535;

export interface PortCheckOptions {
  /** Accept 0 ("any free port, chosen by the kernel"). Default false. */
  allowZero?: boolean;
}

/** Whether `value` is a usable port number (1..65535, or 0 with allowZero). */
export function isPort(value: unknown, options: PortCheckOptions = {}): value is number {
  return (
    typeof value === "number" &&
    Number.isInteger(value) &&
    value >= (options.allowZero ? 0 : 1) &&
    value <= MAX_PORT
  );
}

/** Returns `value` when it is a port, else throws ValidationError naming `what`. */
export function validatePort(what: string, value: unknown, options: PortCheckOptions = {}): number {
  if (!isPort(value, options)) {
    throw new ValidationError(
      `${what} must be an integer port in ${options.allowZero ? 0 : 1}..${MAX_PORT}, got ${String(value)}.`,
      { details: { what, port: value } },
    );
  }
  return value;
}
