/**
 * Guest-controlled text on its way to a human: error messages, `smolvm logs`, `smolvm env list`.
 * The guest is hostile, so such text is bounded (a few KiB in any error) and stripped of terminal
 * control: escape sequences (CSI, OSC, DCS…), C0/C1 control bytes other than tab and newline, and
 * Unicode bidi overrides that make text display differently from what it is.
 */

/** How much guest text any error message quotes. */
export const GUEST_TEXT_IN_ERRORS = 2048;

// ESC [ … final | ESC ] … BEL/ST | ESC P/X/^/_ … ST | ESC + one char; then lone C0/C1 bytes.
const ESCAPES =
  /\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[\s\S]?)/g;
const CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/** Drops terminal control sequences and other non-printing characters; keeps tab and newline. */
export function printable(s: string): string {
  return s.replace(ESCAPES, "").replace(CONTROLS, "");
}

/**
 * Guest text fit to quote: printable, at most `max` characters (the start, or the end with
 * `keep: "tail"`), marked with "…" where cut.
 */
export function guestText(
  s: string | Buffer,
  options: { max?: number; keep?: "head" | "tail" } = {},
): string {
  const max = options.max ?? GUEST_TEXT_IN_ERRORS;
  // Cut before cleaning too, so a huge input costs no more than a bounded regex pass.
  let text = typeof s === "string" ? s : s.toString("utf8");
  const cut = text.length > max * 4;
  if (cut) text = options.keep === "tail" ? text.slice(-max * 4) : text.slice(0, max * 4);
  text = printable(text);
  if (text.length <= max && !cut) return text;
  return options.keep === "tail" ? `…${text.slice(-max)}` : `${text.slice(0, max)}…`;
}
