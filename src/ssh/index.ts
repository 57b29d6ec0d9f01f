// smolvm/ssh: a resilient SSH library for any SSH host, VM or not.

export * from "../command.js";
export * from "../errors.js";
export * from "./auth.js";
export * from "./client.js";
export * from "./connection.js";
export * from "./config.js";
export * from "./events.js";
export * from "./evidence.js";
export * from "./hostkeys.js";
export * from "./known-hosts.js";
export * from "./redact.js";
