/**
 * Shared libraries for the OpenSSH binaries copied into `tiny`.
 *
 * Choice: tiny's sshd, sftp-server and ssh-keygen and their libraries are the host's own
 * installed Debian files, resolved with the host's `ldd`. The host is the same Debian release
 * as the guest kernel packages, so these are the very bytes the openssh-server .deb and its ~25
 * library .debs would unpack to; copying them takes milliseconds where downloading and
 * unpacking every library package takes seconds. Their sha256s are part of the image
 * fingerprint, so a host upgrade of OpenSSH or any library rebuilds the image.
 */
import { HostDependencyError } from "../errors.js";
import { exec } from "./exec.js";

/** Absolute library paths (and the ELF interpreter) from `ldd` output. */
export function parseLdd(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("linux-vdso") || line.includes("statically linked")) continue;
    const arrow = /=>\s+(\/\S+)\s+\(/.exec(line);
    if (arrow) {
      out.push(arrow[1]!);
      continue;
    }
    const direct = /^(\/\S+)\s+\(/.exec(line);
    if (direct) out.push(direct[1]!);
    else if (/=>\s+not found/.test(line)) {
      throw new HostDependencyError(
        `a library OpenSSH needs is missing on this host (${line}): reinstall openssh-server.`,
      );
    }
  }
  return out;
}

/** What `ldd` resolves names through: rewritten whenever libraries are installed or removed. */
export const LD_SO_CACHE = "/etc/ld.so.cache";

export async function sharedLibraries(binaries: readonly string[], signal?: AbortSignal): Promise<string[]> {
  const libs = new Set<string>();
  for (const b of binaries) {
    const { stdout } = await exec("ldd", [b], { signal });
    for (const l of parseLdd(stdout.toString("utf8"))) libs.add(l);
  }
  return [...libs].sort();
}
