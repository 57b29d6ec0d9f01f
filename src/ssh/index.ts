// smolvm/ssh: a resilient SSH library for any SSH host, VM or not.

export * from "../command.js";
export * from "../errors.js";
export * from "./auth.js";
export * from "./automation.js";
export * from "./client.js";
export * from "./config.js";
export * from "./connect-options.js";
export * from "./connection.js";
export * from "./events.js";
export * from "./evidence.js";
export * from "./forward.js";
export * from "./hostkeys.js";
export * from "./keepalive.js";
export * from "./known-hosts.js";
export * from "./proxy.js";
export * from "./redact.js";
export * from "./retry.js";
export * from "./sftp.js";
export * from "./shell.js";
export * from "./socks.js";
export * from "./supervisor.js";
export * from "./watchdog.js";
