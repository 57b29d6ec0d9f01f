// The SSH server matrix against openssh (see ./server-suite.ts and test/fixtures/ssh-servers.ts).
import { serverSuite } from "./server-suite.js";

serverSuite("openssh");
