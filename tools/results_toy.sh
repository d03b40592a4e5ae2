#!/usr/bin/env bash
# tools/results_toy.sh -- every toy run behind RESULTS.md, then its tables and figures.
#
#   bash tools/results_toy.sh            # runs/toy/<name> for each run, then tools/report.py
#   JOBS=2 bash tools/results_toy.sh     # two runs at a time (one thread each)
#
# A finished run folder is kept (not run again); an interrupted one is resumed. The report goes to
# figures/toy (report.md, acc_matrices.png, acc_curves.png), which RESULTS.md shows. Every run uses
# one CPU thread (OMP_NUM_THREADS=1), as RESULTS.md's were made: the thread count changes the order
# of floating-point sums, which moves some toy numbers by a tenth.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=(
  "zero-shot-I    finetune.py --mode zero-shot --order I"
  "zero-shot-II   finetune.py --mode zero-shot --order II"
  "finetune-I     finetune.py --order I"
  "finetune-II    finetune.py --order II"
  "gnsp-I         gnsp.py --order I"
  "gnsp-II        gnsp.py --order II"
  "keeplora-I     keeplora.py --order I"
  "keeplora-II    keeplora.py --order II"
  "keeplora-v1-I  keeplora.py --variant keeplora --order I"
  "keeplora-v1-II keeplora.py --variant keeplora --order II"
  "rank1_pool-I   rank1_pool.py --order I"
  "rank1_pool-II  rank1_pool.py --order II"
  "igsp-I         igsp.py --order I --oracle-eval"
  "igsp-II        igsp.py --order II --oracle-eval"
  "moe-adapters-I  igsp.py --variant moe-adapters --order I --oracle-eval"
  "moe-adapters-II igsp.py --variant moe-adapters --order II --oracle-eval"
  # the protection-off ablations, one mechanism switched off per method (RESULTS.md, beside each method)
  "gnsp-noproject-I          gnsp.py --project none --order I"
  "gnsp-noproject-II         gnsp.py --project none --order II"
  "gnsp-nothing-I            gnsp.py --project none --ref-data none --order I"
  "gnsp-nothing-II           gnsp.py --project none --ref-data none --order II"
  "keeplora-noprotect-I      keeplora.py --protect off --order I"
  "keeplora-noprotect-II     keeplora.py --protect off --order II"
  "rank1_pool-noago-I        rank1_pool.py --ago off --order I"
  "rank1_pool-noago-II       rank1_pool.py --ago off --order II"
  "igsp-nosubspace-I         igsp.py --lambda-s 0 --lambda-o 0 --order I --oracle-eval"
  "igsp-nosubspace-II        igsp.py --lambda-s 0 --lambda-o 0 --order II --oracle-eval"
  "moe-adapters-nofreeze-I   igsp.py --variant moe-adapters --freeze-per-task 0 --order I --oracle-eval"
  "moe-adapters-nofreeze-II  igsp.py --variant moe-adapters --freeze-per-task 0 --order II --oracle-eval"
  # the toy versions of the two other protocols (README, "Class-incremental learning (CIL) and X-TAIL")
  "cil-zero-shot             finetune.py --mode zero-shot --benchmark toy-cil"
  "cil-finetune              finetune.py --benchmark toy-cil"
  "cil-gnsp                  gnsp.py --benchmark toy-cil"
  "cil-keeplora              keeplora.py --benchmark toy-cil"
  "cil-keeplora-v1           keeplora.py --variant keeplora --benchmark toy-cil"
  "cil-rank1_pool            rank1_pool.py --benchmark toy-cil"
  "cil-igsp                  igsp.py --benchmark toy-cil"
  "cil-moe-adapters          igsp.py --variant moe-adapters --benchmark toy-cil"
  "xtail-finetune            finetune.py --benchmark toy-xtail"
  "xtail-gnsp                gnsp.py --benchmark toy-xtail"
  "xtail-keeplora            keeplora.py --benchmark toy-xtail"
  "xtail-keeplora-v1         keeplora.py --variant keeplora --benchmark toy-xtail"
  "xtail-rank1_pool          rank1_pool.py --benchmark toy-xtail"
  "xtail-igsp                igsp.py --benchmark toy-xtail"
  "xtail-moe-adapters        igsp.py --variant moe-adapters --benchmark toy-xtail"
)
one() {  # name script flags...
  local name=$1; shift
  local out=runs/toy/$name
  if [ -f "$out/summary.json" ] && python -c "import json,sys; sys.exit(0 if json.load(open('$out/summary.json'))['complete'] else 1)"; then
    return 0
  fi
  local resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  local bench=(--benchmark toy); [[ " $* " == *" --benchmark "* ]] && bench=()   # a protocol run names its own
  echo "python $* ${bench[*]} --out $out ${resume[*]}" >&2
  python "$@" "${bench[@]}" --no-progress --out "$out" "${resume[@]}" > "runs/toy/$name.log" 2>&1
}
export -f one
mkdir -p runs/toy
if [ "$JOBS" -gt 1 ]; then
  printf '%s\n' "${RUNS[@]}" | xargs -P "$JOBS" -L 1 bash -c 'one "$@"' _
else
  for r in "${RUNS[@]}"; do one $r; done
fi
TOY=$(ls -d runs/toy/*/ | grep -v -e '/cil-' -e '/xtail-')             # the toy benchmark (MTIL's protocol)
python tools/report.py $TOY --out figures/toy
python tools/report.py --benchmark toy-cil runs/toy/cil-*/ --out figures/toy-cil
python tools/report.py --benchmark toy-xtail runs/toy/xtail-*/ --out figures/toy-xtail
python tools/report.py runs/toy/finetune-I/ runs/toy/igsp-I/ --out figures/toy/readme   # README's picture
