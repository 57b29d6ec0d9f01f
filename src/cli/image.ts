/** `smolvm image build|list|rm`: thin wrappers over src/image. */
import type { Command } from "commander";
import { ValidationError } from "../errors.js";
import { buildImage, type ImageName, listImages, removeImage } from "../image/index.js";
import { progressLine } from "./progress-line.js";

const NAMES = ["tiny", "debian"];

function imageName(name: string): ImageName {
  if (!NAMES.includes(name)) {
    throw new ValidationError(`unknown image ${JSON.stringify(name)}: choose one of ${NAMES.join(", ")}.`);
  }
  return name as ImageName;
}

const mib = (n: number) => `${(n / 1048576).toFixed(1)} MiB`;

export function registerImageCommands(program: Command): void {
  const image = program.command("image").description("build, list and remove guest images");

  image
    .command("build")
    .description(
      "build an image (cached by a fingerprint of its inputs; debian needs root and takes minutes)",
    )
    .argument("[name]", `image name: ${NAMES.join(" | ")}`, "tiny")
    .option("--force", "rebuild even if a verified image with the same inputs exists")
    .option("--timeout <seconds>", "give up after this many seconds")
    .action(async (name: string, o: { force?: boolean; timeout?: string }) => {
      const timeoutMs = o.timeout === undefined ? undefined : Number(o.timeout) * 1000;
      if (timeoutMs !== undefined && !(timeoutMs > 0))
        throw new ValidationError("--timeout must be a positive number of seconds.");
      const line = progressLine();
      const m = await buildImage(imageName(name), {
        force: o.force,
        timeoutMs,
        onProgress: line.onProgress,
      }).finally(() => line.close());
      process.stdout.write(`${m.name} ${m.fingerprint.slice(0, 16)} ${m.dir}\n`);
    });

  image
    .command("list")
    .alias("ls")
    .description("list built images (verified against their manifests)")
    .option("--json", "print JSON")
    .action(async (o: { json?: boolean }) => {
      const list = await listImages();
      if (o.json) {
        process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
        return;
      }
      if (list.length === 0) {
        process.stdout.write("no images built yet: run `smolvm image build`\n");
        return;
      }
      for (const i of list) {
        const m = i.manifest;
        const size = m
          ? mib(m.artifacts.kernel.size + m.artifacts.initrd.size + (m.artifacts.rootfs?.size ?? 0))
          : "-";
        const status = i.ok ? "ok" : `BROKEN (${i.error})`;
        process.stdout.write(
          `${i.name.padEnd(8)} ${(m?.fingerprint.slice(0, 16) ?? "-").padEnd(17)}${(m?.kernelRelease ?? "-").padEnd(17)}${size.padEnd(12)}${(m?.createdAt ?? "-").padEnd(26)}${status}\n`,
        );
      }
    });

  image
    .command("rm")
    .description("remove every built copy of an image")
    .argument("<name>", `image name: ${NAMES.join(" | ")}`)
    .action(async (name: string) => {
      const removed = await removeImage(imageName(name));
      process.stdout.write(
        removed.length
          ? `${removed.map((d) => `removed ${d}`).join("\n")}\n`
          : `no ${name} image to remove\n`,
      );
    });
}
