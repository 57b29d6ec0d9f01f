import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 180_000,
    // VM and sshd tests share two cores: keep files sequential so timings stay meaningful.
    fileParallelism: false,
    pool: "forks",
    reporters: ["default"],
  },
});
