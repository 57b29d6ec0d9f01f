/**
 * The guest's managed env file over the agent (format in env-file.ts): read it with GET,
 * update it read-merge-write with PUT, serialized per channel so concurrent updates do not lose
 * each other. A missing file is an empty environment.
 */
import { validateEnv } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import { SmolVMError } from "../errors.js";
import { MAX_PAYLOAD } from "./agent-protocol.js";
import { bounded, type SessionSource } from "./agent-request.js";
import { getStream, putStream } from "./agent-transfer.js";
import { ENV_FILE_MAX, envFileTooLarge, mergeEnv, parseEnvFile, renderEnvFile } from "./env-file.js";
import type { CallOptions } from "./types.js";

export class AgentEnv {
  private lock: Promise<unknown> = Promise.resolve();

  constructor(private readonly source: SessionSource) {}

  list(options: CallOptions): Promise<Record<string, string>> {
    return bounded(options, "reading the guest env file", async (deadline) =>
      parseEnvFile(await this.read(deadline)),
    );
  }

  set(vars: Record<string, string>, options: CallOptions): Promise<void> {
    validateEnv(vars);
    return this.update(vars, [], options);
  }

  unset(names: string[], options: CallOptions): Promise<void> {
    mergeEnv({}, {}, names);
    return this.update({}, names, options);
  }

  private async read(deadline: Deadline): Promise<string> {
    const parts: Buffer[] = [];
    let size = 0;
    try {
      await getStream(
        this.source,
        { envFile: true },
        (data) => {
          size += data.length;
          if (size > ENV_FILE_MAX) throw envFileTooLarge();
          parts.push(data);
        },
        () => {},
        deadline,
        "reading the guest env file",
      );
    } catch (err) {
      if (err instanceof SmolVMError && err.details.agentCode === "NOT_FOUND") return "";
      throw err;
    }
    return Buffer.concat(parts).toString("utf8");
  }

  /** Read-merge-write, serialized per channel so concurrent updates do not lose each other. */
  private update(set: Record<string, string>, unset: string[], options: CallOptions): Promise<void> {
    return bounded(options, "updating the guest env file", (deadline) => {
      const task = this.lock.then(async () => {
        const next = mergeEnv(parseEnvFile(await this.read(deadline)), set, unset);
        const body = Buffer.from(renderEnvFile(next));
        await putStream(
          this.source,
          { envFile: true },
          0o600,
          true,
          async function* () {
            for (let off = 0; off < body.length; off += MAX_PAYLOAD)
              yield body.subarray(off, off + MAX_PAYLOAD);
          },
          deadline,
          "writing the guest env file",
        );
      });
      this.lock = task.catch(() => {});
      return deadline.race(task);
    });
  }
}
