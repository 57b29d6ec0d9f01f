import { defineConfig } from "vitest/config";
import LeakCheckLastSequencer from "./test/sequencer.js";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 180_000,
    // VM and sshd tests share two cores: keep files sequential so timings stay meaningful.
    fileParallelism: false,
    pool: "forks",
    reporters: ["default"],
    // Temp root for the suite, and the teardown that kills what a failed test left running.
    globalSetup: ["test/global-setup.ts"],
    sequence: { sequencer: LeakCheckLastSequencer },
  },
});
