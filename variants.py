"""The stage-4 runs the launchers know: the paper's method, its ablations and the weighting
studies. The one list of them: finetune_multi_domain.sh asks it for each run's flags, report.py
for each row's label. Torch-free, so a launcher's query costs a fraction of a second.

A variant is a domain-weighting strategy (weighting.WEIGHTINGS, chosen by --domain_weighting)
plus the graph flags of the run. Adding a weighting method: its class in weighting.py, then
its row here.

    python variants.py args hrkd      # the flags of one variant
    python variants.py names          # every variant
"""
import sys
from typing import Dict, NamedTuple


class Variant(NamedTuple):
    label: str          # the row of report.py's table
    flags: str          # finetune_multi_domain.py flags
    paper: bool = False  # a row of the paper's table (shown even without runs)


VARIANTS: Dict[str, Variant] = {
    "no_graph": Variant("Multi-domain KD (no graph)", "--no_use_graph", paper=True),
    "no_hierarchy": Variant("HRKD (no hierarchy)", "--use_graph --no_hierarchical", paper=True),
    "uniform": Variant("HRKD (uniform weights)", "--domain_weighting uniform"),
    "meta": Variant("HRKD (meta graph)", "--domain_weighting meta"),
    "meta_gold": Variant("HRKD (meta graph, gold objective)",
                         "--domain_weighting meta --meta_objective gold"),
    "meta_scorer": Variant("HRKD (meta-learned domain scorer)",
                           "--domain_weighting meta_scorer"),
    "meta_scorer_gold": Variant("HRKD (meta-learned domain scorer, gold objective)",
                                "--domain_weighting meta_scorer --meta_objective gold"),
    "trained_graph": Variant("HRKD (trained graph)", "--use_graph --hierarchical --train_graph"),
    "hrkd": Variant("HRKD", "--use_graph --hierarchical", paper=True),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["names"] and len(argv) == 1:
        print(" ".join(VARIANTS))
        return 0
    if argv[:1] == ["args"] and len(argv) == 2:
        if argv[1] not in VARIANTS:
            print(f"error: unknown variant '{argv[1]}' (expected one of {', '.join(VARIANTS)})",
                  file=sys.stderr)
            return 1
        print(VARIANTS[argv[1]].flags)
        return 0
    print("usage: variants.py names | args VARIANT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
