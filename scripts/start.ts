/**
 * Interim `npm start`: starts a local OpenSSH sshd (the test fixture), runs the SSHClient
 * examples against it, prints first vs warm command timings, then stops sshd.
 */
import { OperationTimeoutError } from "../src/errors.js";
import { SSHClient } from "../src/ssh/client.js";
import { SshdFixture } from "../test/fixtures/sshd.js";

const sshd = await SshdFixture.start();
try {
  console.log(`sshd listening on ${sshd.host}:${sshd.port} (user ${sshd.user})`);
  const client = new SSHClient({
    host: sshd.host,
    port: sshd.port,
    user: sshd.user,
    keyPath: sshd.clientKey.path,
    hostKey: { knownHostsPath: sshd.knownHostsPath },
  });
  console.log(`connected before first call: ${client.connected}`);
  await client.waitForSsh({ timeoutMs: 30_000 });

  let r = await client.run("echo 'Hello from the server'");
  console.log(`stdout: ${r.output}  exitCode: ${r.exitCode}`);
  r = await client.run("test -f /etc/passwd");
  console.log(`/etc/passwd exists: ${r.ok}`);
  r = await client.run("ls /nonexistent");
  console.log(`ls /nonexistent failed as expected: ${!r.ok} (${r.stderr.trim()})`);
  r = await client.run("whoami", { shell: "raw" });
  console.log(`raw whoami: ${r.output}`);
  try {
    await client.run("sleep 5", { timeoutMs: 300 });
  } catch (e) {
    if (e instanceof OperationTimeoutError) console.log(`timeout: ${e.message}`);
    else throw e;
  }

  await client.close();
  const fresh = new SSHClient({
    host: sshd.host,
    port: sshd.port,
    user: sshd.user,
    keyPath: sshd.clientKey.path,
    hostKey: { knownHostsPath: sshd.knownHostsPath },
  });
  const times: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    await fresh.run("echo test");
    times.push(performance.now() - t);
  }
  console.log(`first command (connects): ${times[0]!.toFixed(1)} ms`);
  console.log(`second command (warm):    ${times[1]!.toFixed(1)} ms`);
  console.log(`third command (warm):     ${times[2]!.toFixed(1)} ms`);
  await fresh.close();
} finally {
  await sshd.stop();
}
