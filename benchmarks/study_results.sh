#!/usr/bin/env bash
# A finished study's files for results/ (issue 23), from its SQLite file, in one command:
#
#   bash benchmarks/study_results.sh DIR DEVICE [TARGET]
#
# DIR holds NAME.db and NAME_windows.txt (gpu_study_window.sh's), and stage2.json once the
# winner's Stage 2 has run. Writes into DIR: summary.json (study_summary.py), status.txt and
# status.json (nkat-search status), export/ (the top 5 with plots and trials.csv) and report.md
# (study_report.py, with the Stage 2 table when stage2.json is there; TARGET is the Global TPE
# asked of the winner). Every file is made from the SQLite file alone; run it again to refresh.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: study_results.sh DIR DEVICE [TARGET]" >&2; exit 2; }
dir=${1%/} device=$2 target=${3:-}
dbs=("$dir"/*.db)
[ ${#dbs[@]} -eq 1 ] && [ -f "${dbs[0]}" ] || {
  echo "study_results.sh: $dir must hold exactly one SQLite file (NAME.db)" >&2; exit 2; }
db=${dbs[0]} name=$(basename "${dbs[0]}" .db)
here=$(cd "$(dirname "$0")" && pwd)
windows=()
[ -f "$dir/${name}_windows.txt" ] && windows=(--windows "$dir/${name}_windows.txt")
python "$here/study_summary.py" "$db" --device "$device" "${windows[@]}" \
  --out "$dir/summary.json" > /dev/null
nkat-search status --study "$name" --storage "$db" > "$dir/status.txt"
nkat-search status --study "$name" --storage "$db" --json > "$dir/status.json"
nkat-search export --study "$name" --storage "$db" --top 5 --out "$dir/export"
report=(--summary "$dir/summary.json" --out "$dir/report.md")
[ -f "$dir/stage2.json" ] && report+=(--stage2 "$dir/stage2.json")
[ -n "$target" ] && report+=(--target "$target")
python "$here/study_report.py" "${report[@]}" > /dev/null
echo "wrote $dir/summary.json, status.txt, status.json, export/ and report.md"
