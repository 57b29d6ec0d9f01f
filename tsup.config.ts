import { defineConfig } from "tsup";

export default defineConfig({
  entry: ["src/index.ts", "src/ssh/index.ts", "src/cli/smolvm.ts", "src/cli/smolssh.ts", "src/vm/network/daemon.ts", "src/vm/network/relay.ts"],
  format: ["esm"],
  target: "node20",
  dts: true,
  sourcemap: true,
  clean: true,
  splitting: true,
});
