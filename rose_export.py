"""`rose-export`, the one entry point: it composes the commands of pruning (`rose.cli`), formats (`export.cli`)
and benchmarks (`runtime_bench.cli`); no package's CLI imports another's."""
from __future__ import annotations

import export.cli
import rose.cli
import runtime_bench.cli
from rose.clikit import entry_point
from rose.errors import RoseError
from runtime.errors import RoseRuntimeError

main = entry_point(
    """Prune a causal LM in one shot (ROSE, SparseGPT, Wanda, magnitude) and ship it as a sparse model.

    \b
    Start with:  rose-export prune --out pruned/ --calib valid.txt --nsamples 64 --seqlen 512
    Evaluate:    rose-export eval --model pruned/ --data test.txt --seqlen 512
    Deploy:      rose-export prune-and-export --sparsity 2:4 --calib valid.txt --out model/
    """,
    [*rose.cli.COMMANDS, *export.cli.COMMANDS, *runtime_bench.cli.COMMANDS],
    user_errors=(RoseError, RoseRuntimeError),
)

if __name__ == "__main__":  # pragma: no cover
    main()
