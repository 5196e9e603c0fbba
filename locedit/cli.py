"""`locedit COMMAND ...`: one entry point for every stage. Each command is also `python -m locedit.COMMAND`.

Each command module has `main(...)` (callable from Python and tests) and `cli(argv)`, which reports a user's mistake
in one line through `locedit.core.errors.run_cli`, the one user-error handler.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("locedit.train", "train the optimal edit at a set of heads with IPO, from a recipe"),
    "probe": ("locedit.probe", "probe every head for the behaviour (ITI's localization): accuracy map, u, sigma"),
    "iti": ("locedit.iti", "make ITI's edit (alpha * sigma * u at the selected heads) as a run directory"),
    "eval": ("locedit.eval", "evaluate edits and the base model: True*Info, MC1/MC2, KL, CE on test questions"),
    "judge-train": ("locedit.judge_train", "train a truth or info judge on the GPT-judge data (cpu, or hf with TRL)"),
    "judge-validate": ("locedit.judge_validate", "the cpu judges' accuracy on TruthfulQA's judge data, two protocols"),
    "study": ("locedit.study", "probe, ITI, optimal edits at probe/random/single/all heads, eval, table and plot"),
    "sweep": ("locedit.sweep", "run a W&B grid sweep file here: one run at a time or one per GPU, resumable"),
    "report": ("locedit.report", "aggregate evaluated runs: table, the paper's figures, p-values and verdict"),
    "dashboard": ("locedit.dashboard", "a study's, recipe's or project's runs on trackio's dashboard, served here"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: locedit COMMAND [RECIPE] [--key value ...]", "", "commands:"]
        lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"locedit: error: unknown command '{argv[0]}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
