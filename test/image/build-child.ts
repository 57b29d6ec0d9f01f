// Run by tiny-boot.test.ts in a separate process: builds tiny into argv[2] and prints the result.
import { buildImage } from "../../src/image/index.js";

const [dataDir, force] = process.argv.slice(2);
buildImage("tiny", { dataDir, force: force === "force", timeoutMs: 120_000 }).then(
  (m) => process.stdout.write(`${JSON.stringify({ dir: m.dir, fingerprint: m.fingerprint })}\n`),
  (e) => {
    process.stderr.write(`${e?.code ?? ""} ${e?.message ?? e}\n`);
    process.exitCode = 1;
  },
);
