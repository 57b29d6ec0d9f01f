// The SSH server matrix against asyncssh (see ./server-suite.ts and test/fixtures/ssh-servers.ts).
import { serverSuite } from "./server-suite.js";

serverSuite("asyncssh");
