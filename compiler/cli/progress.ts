/**
 * Progress on stderr for long commands, shared by every command.
 *
 *   const progress = progressOf(io);   // shared.ts
 *   progress.stage('decode', steps);   // a bar of `steps` units (or `stage(label)`: one line)
 *   for (...) { ...; progress.tick(); }
 *   progress.stop();                   // optional: main() stops it on every exit, error or not
 *
 * Where it draws (decided once per command by main() from the global flags):
 * - stderr is a TTY: a cli-progress bar, cleared when the stage ends, so a failing command
 *   leaves only its `modc: ...` line;
 * - stderr is not a TTY (a file, a pipe, a test): nothing, unless `--progress` is given; then
 *   one plain line per stage (`[label] N steps`), never a bar;
 * - `--quiet` / `-q`: nothing, whatever stderr is.
 */
import cliProgress from 'cli-progress';
import { SILENT_PROGRESS, type CliOption, type CliValues, type Io, type Progress } from './command.js';

/** The flags every command takes (main() adds them to each command's options). */
export const PROGRESS_OPTIONS: Record<string, CliOption> = {
  progress: { type: 'boolean', help: 'show progress on stderr even when it is not a terminal (one line per stage)' },
  quiet: { type: 'boolean', short: 'q', help: 'no progress or status lines on stderr (errors still print)' },
};

export type ProgressMode = 'bar' | 'lines' | 'off';

/** Which kind of progress a command gets: see the file comment. */
export function progressMode(values: CliValues, errIsTty: boolean): ProgressMode {
  if (values.quiet) return 'off';
  if (errIsTty) return 'bar';
  return values.progress ? 'lines' : 'off';
}

/** Makes the reporter for `mode`; `stream` is the real stderr (needed for the bar). */
export function createProgress(mode: ProgressMode, io: Pick<Io, 'err'>, stream?: NodeJS.WritableStream): Progress {
  if (mode === 'off') return SILENT_PROGRESS;
  if (mode === 'lines' || !stream) return lineProgress(io);
  return barProgress(stream);
}

function lineProgress(io: Pick<Io, 'err'>): Progress {
  return {
    stage(label, total) {
      io.err(`[${label}]${total !== undefined ? ` ${total} step${total === 1 ? '' : 's'}` : ''}`);
    },
    tick() {},
    stop() {},
  };
}

function barProgress(stream: NodeJS.WritableStream): Progress {
  let bar: cliProgress.SingleBar | undefined;
  const stop = (): void => {
    bar?.stop();
    bar = undefined;
  };
  return {
    stage(label, total) {
      stop();
      bar = new cliProgress.SingleBar(
        {
          stream,
          format: total === undefined ? `${label} ...` : `${label} [{bar}] {value}/{total} | {duration_formatted}`,
          clearOnComplete: true,
          hideCursor: true,
          barsize: 30,
          fps: 10,
        },
        cliProgress.Presets.shades_classic,
      );
      bar.start(total ?? 1, 0);
    },
    tick(n = 1) {
      bar?.increment(n);
    },
    stop,
  };
}
