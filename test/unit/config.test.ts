import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { homedir, userInfo } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { globPaths, type ResolvedSshConfig, resolveSshConfig } from "../../src/ssh/config.js";
import { parseSshConfig, splitConfigArgs } from "../../src/ssh/config-parse.js";
import { expandTokens } from "../../src/ssh/config-tokens.js";

let dir: string;
const savedHome = process.env.HOME;
beforeAll(() => {
  dir = mkdtempSync(join("/tmp", "smolvm-sshcfg-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => {
  process.env.HOME = savedHome;
});

function write(name: string, text: string): string {
  const p = join(dir, name);
  mkdirSync(join(p, ".."), { recursive: true });
  writeFileSync(p, text);
  return p;
}

/** OpenSSH's own resolution: `ssh -G`, as keyword -> values. */
function sshG(file: string, host: string, extra: string[] = []): Map<string, string[]> {
  const out = execFileSync("ssh", ["-G", "-F", file, ...extra, host], { encoding: "utf8", stdio: "pipe" });
  const m = new Map<string, string[]>();
  for (const line of out.split("\n")) {
    const i = line.indexOf(" ");
    if (i < 0) continue;
    const k = line.slice(0, i);
    m.set(k, [...(m.get(k) ?? []), line.slice(i + 1)]);
  }
  return m;
}

const POLICY: Record<string, string> = {
  true: "strict",
  ask: "strict",
  false: "insecure",
  "accept-new": "accept-new",
};

function expectSameAsOpenSSH(file: string, host: string, r: ResolvedSshConfig, extra: string[] = []): void {
  const g = sshG(file, host, extra);
  const one = (k: string) => g.get(k)?.[0];
  expect(r.hostName, `${host} hostname`).toBe(one("hostname"));
  expect(r.port, `${host} port`).toBe(Number(one("port")));
  expect(r.user, `${host} user`).toBe(one("user"));
  expect(r.identitiesOnly, `${host} identitiesonly`).toBe(one("identitiesonly") === "yes");
  expect(r.serverAliveIntervalMs, `${host} serveraliveinterval`).toBe(
    Number(one("serveraliveinterval")) * 1000,
  );
  expect(r.serverAliveCountMax, `${host} serveralivecountmax`).toBe(Number(one("serveralivecountmax")));
  const ct = one("connecttimeout");
  expect(r.connectTimeoutMs, `${host} connecttimeout`).toBe(ct === "none" ? undefined : Number(ct) * 1000);
  expect(r.strictHostKeyChecking, `${host} stricthostkeychecking`).toBe(
    POLICY[one("stricthostkeychecking")!],
  );
  expect(r.userKnownHostsFiles, `${host} userknownhostsfile`).toEqual(one("userknownhostsfile")!.split(" "));
  expect(r.proxyJump, `${host} proxyjump`).toBe(one("proxyjump"));
  // ssh -G prints ProxyCommand before token expansion; we expand %h %p %r %n.
  const pc = one("proxycommand")
    ?.replace(/%h/g, r.hostName)
    .replace(/%p/g, String(r.port))
    .replace(/%r/g, r.user)
    .replace(/%n/g, host);
  expect(r.proxyCommand, `${host} proxycommand`).toBe(pc);
  if (r.identityFiles.length) {
    // ssh -G prints IdentityFile before token expansion (it expands when loading keys).
    const theirs = g.get("identityfile")!.map((f) =>
      f
        .replace(/^~(?=\/)/, homedir())
        .replace(/%r/g, r.user)
        .replace(/%h/g, r.hostName)
        .replace(/%p/g, String(r.port)),
    );
    expect(r.identityFiles, `${host} identityfile`).toEqual(theirs);
  }
}

describe("splitConfigArgs and parseSshConfig", () => {
  it("splits quoted, escaped and commented arguments", () => {
    expect(splitConfigArgs(` a "b c" 'd e' f\\ g # comment`).args).toEqual(["a", "b c", "d e", "f g"]);
    expect(splitConfigArgs(`"with \\" quote"`).args).toEqual(['with " quote']);
    expect(splitConfigArgs(`"open`).error).toBe("unterminated quote");
    expect(splitConfigArgs("").args).toEqual([]);
  });

  it("parses Host, Match, Include, Key=Value and reports bad lines", () => {
    const f = parseSshConfig(
      [
        "# top comment",
        "Port=2200",
        "  user = alice",
        "Host a b !c",
        '\tIdentityFile "/path with space/id"',
        "Match host x,y !user bob all",
        "Match !originalhost z",
        "Match exec",
        "Match all",
        "Include a/*.conf b.conf",
        "ProxyCommand ssh -W %h:%p jump # not a comment here",
        'IdentityFile "oops',
        "Host",
        "= nonsense",
      ].join("\n"),
      { filePath: "/cfg" },
    );
    expect(f.filePath).toBe("/cfg");
    expect(f.lines).toEqual([
      { kind: "option", line: 2, keyword: "port", args: ["2200"], value: "2200" },
      { kind: "option", line: 3, keyword: "user", args: ["alice"], value: "alice" },
      { kind: "host", line: 4, patterns: ["a", "b", "!c"] },
      {
        kind: "option",
        line: 5,
        keyword: "identityfile",
        args: ["/path with space/id"],
        value: '"/path with space/id"',
      },
      { kind: "match", line: 7, criteria: [{ negate: true, name: "originalhost", arg: "z" }] },
      { kind: "match", line: 9, criteria: [{ negate: false, name: "all" }] },
      { kind: "include", line: 10, patterns: ["a/*.conf", "b.conf"] },
      {
        kind: "option",
        line: 11,
        keyword: "proxycommand",
        args: ["ssh -W %h:%p jump # not a comment here"],
        value: "ssh -W %h:%p jump # not a comment here",
      },
    ]);
    expect(f.errors.map((e) => e.line)).toEqual([6, 8, 12, 13, 14]);
  });

  it("expands tokens", () => {
    const ctx = {
      hostName: "h.example",
      originalHost: "h",
      port: 2222,
      remoteUser: "bob",
      localUser: "me",
      homeDir: "/home/me",
    };
    expect(expandTokens("%h %p %r %u %n %d %% %%h %x", ctx)).toBe("h.example 2222 bob me h /home/me % %h %x");
    expect(expandTokens("%h %p", ctx, "h%")).toBe("h.example %p");
  });
});

describe("resolveSshConfig agrees with `ssh -G`", () => {
  it("Host patterns, negation, first value wins, defaults", () => {
    const cfg = write(
      "basic/config",
      [
        "Host web? !web9",
        "  HostName %h.internal.example",
        "  Port 2201",
        "  User deploy",
        "  IdentityFile ~/.ssh/web_%r_%h",
        "  IdentityFile /keys/%p/second",
        "  IdentitiesOnly yes",
        "Host *.prod db",
        "  StrictHostKeyChecking accept-new",
        "  ServerAliveInterval 15",
        "  ServerAliveCountMax 5",
        "  ConnectTimeout 9",
        "Host web1",
        "  Port 9999",
        "  User ignored",
        "Host db",
        '  UserKnownHostsFile "/tmp/kh_one" ~/kh2',
        "  ProxyJump bastion1,bastion2",
        "Host nocheck",
        "  StrictHostKeyChecking no",
        "  ProxyCommand nc %h %p",
        "  ProxyJump ignored-because-command-came-first",
        "Host ask",
        "  StrictHostKeyChecking ask",
        "Host *",
        "  ServerAliveInterval 60",
        "  User fallback",
      ].join("\n"),
    );
    for (const host of ["web1", "web9", "WEB2", "api.prod", "db", "nocheck", "ask", "other"]) {
      const r = resolveSshConfig(host, { configPath: cfg });
      expect(r.warnings).toEqual([]);
      expectSameAsOpenSSH(cfg, host, r);
    }
    const web1 = resolveSshConfig("web1", { configPath: cfg });
    expect(web1).toMatchObject({
      hostName: "web1.internal.example",
      port: 2201,
      user: "deploy",
      identityFiles: [`${homedir()}/.ssh/web_deploy_web1.internal.example`, "/keys/2201/second"],
      identitiesOnly: true,
      serverAliveIntervalMs: 60_000,
    });
    expect(web1.configured).toContain("hostname");
    expect(resolveSshConfig("nocheck", { configPath: cfg }).proxyCommand).toBe("nc nocheck 22");
    expect(resolveSshConfig("db", { configPath: cfg }).proxyJump).toBe("bastion1,bastion2");
    // Nothing configured: OpenSSH defaults.
    const other = resolveSshConfig("other", { configPath: cfg });
    expect(other).toMatchObject({ hostName: "other", port: 22, identityFiles: [], identitiesOnly: false });
  });

  it("command-line user and port win over the file, and Match user sees them", () => {
    const cfg = write(
      "cli/config",
      ["Match user admin", "  Port 2022", "Host *", "  User fileuser", "  Port 2000"].join("\n"),
    );
    for (const [opts, extra] of [
      [{}, []],
      [{ user: "admin" }, ["-l", "admin"]],
      [{ port: 4444 }, ["-p", "4444"]],
      [{ user: "admin", port: 4444 }, ["-l", "admin", "-p", "4444"]],
    ] as const) {
      expectSameAsOpenSSH(cfg, "h", resolveSshConfig("h", { configPath: cfg, ...opts }), [...extra]);
    }
    expect(resolveSshConfig("h", { configPath: cfg, user: "admin" }).port).toBe(2022);
  });

  it("Match host sees HostName; originalhost sees the alias; Match all and negation", () => {
    const cfg = write(
      "match/config",
      [
        "Host alias",
        "  HostName real.example.org",
        "Match host *.example.org",
        "  Port 2300",
        "Match originalhost alias",
        "  User aliasuser",
        "Match !host *.example.org",
        "  ConnectTimeout 3",
        `Match localuser ${userInfo().username} host other`,
        "  ServerAliveCountMax 9",
        "Match all",
        "  IdentitiesOnly yes",
      ].join("\n"),
    );
    for (const host of ["alias", "real.example.org", "other"]) {
      expectSameAsOpenSSH(cfg, host, resolveSshConfig(host, { configPath: cfg }));
    }
    expect(resolveSshConfig("alias", { configPath: cfg })).toMatchObject({ port: 2300, user: "aliasuser" });
  });

  it("Match final applies in a second pass", () => {
    const cfg = write(
      "final/config",
      ["Match final", "  Port 2500", "  User finaluser", "Host h", "  User early"].join("\n"),
    );
    const r = resolveSshConfig("h", { configPath: cfg });
    expectSameAsOpenSSH(cfg, "h", r);
    expect(r).toMatchObject({ port: 2500, user: "early" });
  });

  it("Include with globs, conditional on the enclosing Host block", () => {
    write("inc/conf.d/10-a.conf", "Host a\n  Port 1010\n");
    write("inc/conf.d/20-b.conf", "Host b\n  Port 2020\nHost *\n  ConnectTimeout 20\n");
    write("inc/conf.d/ignored.txt", "Host a\n  Port 9\n");
    write("inc/only-c.conf", "User cuser\nHost *\n  ServerAliveInterval 7\n");
    const cfg = write(
      "inc/config",
      [
        `Include ${dir}/inc/conf.d/*.conf`,
        "Host c",
        `  Include ${dir}/inc/only-c.conf`,
        "  Port 3030",
        "Host *",
        "  ConnectTimeout 30",
      ].join("\n"),
    );
    for (const host of ["a", "b", "c", "d"]) {
      expectSameAsOpenSSH(cfg, host, resolveSshConfig(host, { configPath: cfg }));
    }
    expect(resolveSshConfig("a", { configPath: cfg })).toMatchObject({
      port: 1010,
      connectTimeoutMs: 20_000,
    });
    expect(resolveSshConfig("c", { configPath: cfg })).toMatchObject({
      user: "cuser",
      serverAliveIntervalMs: 7000,
    });
    expect(resolveSshConfig("d", { configPath: cfg }).user).not.toBe("cuser");
    expect(resolveSshConfig("a", { configPath: cfg }).files).toEqual([
      cfg,
      `${dir}/inc/conf.d/10-a.conf`,
      `${dir}/inc/conf.d/20-b.conf`,
      // Read (OpenSSH reads it too) but not applied: its Include sits in the inactive `Host c`.
      `${dir}/inc/only-c.conf`,
    ]);
  });

  it("relative Include is relative to ~/.ssh; ~/.ssh/config is the default", () => {
    const home = join(dir, "home");
    write("home/.ssh/config", "Include extra/*.conf\nHost *\n  Port 2600\n");
    write("home/.ssh/extra/x.conf", "Host viainclude\n  User included\n");
    process.env.HOME = home;
    const r = resolveSshConfig("viainclude", { systemConfigPath: false });
    expect(r).toMatchObject({ user: "included", port: 2600 });
    expect(r.userKnownHostsFiles).toEqual([`${home}/.ssh/known_hosts`, `${home}/.ssh/known_hosts2`]);
    expect(r.files).toEqual([`${home}/.ssh/config`, `${home}/.ssh/extra/x.conf`]);
    // A system file is read after the user file.
    const sys = write("etc/ssh_config", "Host *\n  Port 1\n  ConnectTimeout 4\n");
    expect(resolveSshConfig("viainclude", { systemConfigPath: sys })).toMatchObject({
      port: 2600,
      connectTimeoutMs: 4000,
    });
  });

  it("include loops are cut at depth 16, FIFOs are never read, bad values warn", () => {
    const loop = write("loop/config", `Include ${dir}/loop/config\nHost *\n  Port 2700\n`);
    const r = resolveSshConfig("h", { configPath: loop });
    expect(r.port).toBe(2700);
    expect(r.warnings.some((w) => w.includes("deeper than 16"))).toBe(true);

    const fifo = join(dir, "loop", "fifo");
    spawnSync("mkfifo", [fifo]);
    const withFifo = write("loop/fifo-config", `Include ${fifo}\nPort 2800\nConnectTimeout soon\n`);
    const t0 = performance.now();
    const r2 = resolveSshConfig("h", { configPath: withFifo });
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(r2.port).toBe(2800);
    expect(r2.connectTimeoutMs).toBeUndefined();
    expect(r2.warnings.join("\n")).toMatch(/cannot read .*fifo/);
    expect(r2.warnings.join("\n")).toContain("ConnectTimeout soon");
    expect(() => resolveSshConfig("h", { configPath: fifo })).toThrow(ValidationError);
    expect(() => resolveSshConfig("h", { configPath: join(dir, "nope") })).toThrow(ValidationError);
  });

  it("globPaths sorts and supports ? and classes", () => {
    write("glob/a1", "");
    write("glob/a2", "");
    write("glob/b1", "");
    write("glob/.hidden", "");
    expect(globPaths(`${dir}/glob/*`)).toEqual([`${dir}/glob/a1`, `${dir}/glob/a2`, `${dir}/glob/b1`]);
    expect(globPaths(`${dir}/glob/?1`)).toEqual([`${dir}/glob/a1`, `${dir}/glob/b1`]);
    expect(globPaths(`${dir}/glob/[!b]*`)).toEqual([`${dir}/glob/a1`, `${dir}/glob/a2`]);
    expect(globPaths(`${dir}/nothing/*`)).toEqual([]);
  });
});
