import { describe, expect, it } from "vitest";
import { GUEST_TEXT_IN_ERRORS, guestText, printable } from "../../src/common/guest-text.js";

describe("guest text", () => {
  it("strips CSI, OSC, DCS, lone escapes, C0/C1 controls and bidi overrides; keeps tab and newline", () => {
    expect(printable("a\x1b[31mb\x1b[0m\tc\n")).toBe("ab\tc\n");
    expect(printable("x\x1b]0;title\x07y\x1b]8;;http://e\x1b\\z")).toBe("xyz");
    expect(printable("p\x1bPq#0;2;0;0;0\x1b\\q")).toBe("pq");
    expect(printable("\x1bcreset\x9b2J\x07\x08\x7f")).toBe("reset2J");
    expect(printable("abc\u202edcba\u2066")).toBe("abcdcba");
    expect(printable("héllo ✓")).toBe("héllo ✓");
  });

  it("bounds what an error quotes, from the start or the end", () => {
    const big = `${"a".repeat(10_000)}\x1b[2J${"z".repeat(10_000)}`;
    const head = guestText(big);
    expect(head.length).toBe(GUEST_TEXT_IN_ERRORS + 1);
    expect(head.endsWith("a…")).toBe(true);
    const tail = guestText(Buffer.from(big), { keep: "tail", max: 100 });
    expect(tail).toBe(`…${"z".repeat(100)}`);
    expect(guestText("short")).toBe("short");
  });
});
