/**
 * Known limits of SSH servers, by their identification string: how many sessions they run at
 * once, how many they serve per connection, and whether they answer keepalive@openssh.com.
 * Pure: SSHConnection and SSHClient adapt to the answer.
 */

/** What one server allows per connection, from its identification (see serverQuirks). */
export interface ServerQuirks {
  /** Sessions that may be open at once. */
  maxSessions: number;
  /** Sessions the server serves before it closes the connection (tinysshd: one). */
  sessionsPerConnection: number;
  /** Whether it answers keepalive@openssh.com (global requests); tinysshd does not. */
  answersKeepalive: boolean;
}

/**
 * Known limits by server identification. dropbear before 2024.86 can close a session that is
 * open but not yet exec'd when another session's command exits in that window (dropbear issue
 * #321): the exec is then refused, or it runs and the connection process dies on
 * `!channel->sent_close`, taking every session with it; one session at a time avoids the
 * window, so commands to those servers queue. tinysshd serves one session per connection and
 * then exits (SSHClient opens a connection per command for it), and leaves keepalive@openssh.com
 * unanswered: the SSH keepalive is off for it and TCP keepalive watches the link instead.
 */
export function serverQuirks(serverVersion: string | undefined): ServerQuirks {
  const v = serverVersion ?? "";
  const none = {
    maxSessions: Number.POSITIVE_INFINITY,
    sessionsPerConnection: Number.POSITIVE_INFINITY,
    answersKeepalive: true,
  };
  const m = /^dropbear_(\d{4})\.(\d+)/.exec(v);
  if (m && Number(m[1]) * 100 + Number(m[2]) < 2024_86) return { ...none, maxSessions: 1 };
  if (/^tinyssh_/.test(v)) return { maxSessions: 1, sessionsPerConnection: 1, answersKeepalive: false };
  return none;
}
