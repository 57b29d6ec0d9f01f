// smolvm/ssh: a resilient SSH library for any SSH host, VM or not.

export * from "../command.js";
export * from "../errors.js";
