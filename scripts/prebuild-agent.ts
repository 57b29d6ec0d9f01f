/**
 * `npm pack` (prepack): compiles the static x86_64 guest agent into agent/prebuilt/x86_64/, so
 * the published package works on hosts without a C toolchain or with another architecture.
 */
import { writePrebuiltAgent } from "../src/image/agent-build.js";

try {
  const bin = await writePrebuiltAgent({ timeoutMs: 300_000 });
  console.log(`prebuilt guest agent: ${bin}`);
} catch (e) {
  console.error(`smolvm: ${(e as Error).message}`);
  process.exit(1);
}
