/** Runs the files in vitest's order, except that the leak check comes last. */
import { BaseSequencer, type TestSpecification } from "vitest/node";

export const LAST_FILE = "zz-no-leftovers.test.ts";

export default class LeakCheckLastSequencer extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    const isLast = (f: TestSpecification) => f.moduleId.endsWith(LAST_FILE);
    return [...sorted.filter((f) => !isLast(f)), ...sorted.filter(isLast)];
  }
}
