#!/usr/bin/env bash
# The first hour of a new user, replayed: a clean clone, the README's first commands, each in an 80-column
# terminal (a pseudo-terminal from `script`, so Rich draws what a person sees; NO_COLOR keeps the file plain).
# Writes TRANSCRIPT (default: examples/first_hour/transcript.txt) with each command, its output and its time.
#   bash examples/first_hour/run.sh [TRANSCRIPT]
# Run from the repository root with spectool's dependencies installed; the commands run this checkout's code
# (a clean clone of it in a temporary directory), offline (HF_HUB_OFFLINE=1: the catalog answers for Qwen3-8B).
set -uo pipefail
repo=$(pwd)
transcript=$(realpath -m "${1:-examples/first_hour/transcript.txt}")
work=$(mktemp -d)
git clone -q "$repo" "$work/spectool"
cd "$work/spectool" || exit 1
export PYTHONPATH="$work/spectool" HF_HUB_OFFLINE=1 NO_COLOR=1 COLUMNS=80 LINES=40 TERM=dumb  # dumb: a progress bar is drawn once, at its end
commands=(
  "spectool --version"
  "spectool demo"
  "spectool chat --prompt 'How do I read a file line by line in Python?' -n 64"
  "spectool bench --draft spectool-demo --prompts heldout --limit 8 -n 64"
  "spectool inspect Qwen/Qwen3-8B --method eagle3"
  "spectool layers --num-feature-layers 5"
  "spectool init tiny --method eagle3 --out e3"
  "spectool train --target tiny --method eagle3 --data demo --out e3-trained --max-steps 20"
)
{
  echo "# spectool's first hour, replayed by examples/first_hour/run.sh on $(date -u +%Y-%m-%d)"
  echo "# machine: $(uname -sm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores;"
  echo "# an 80-column terminal; commit $(git -C "$repo" rev-parse --short HEAD)"
} > "$transcript"
for command in "${commands[@]}"; do
  start=$(date +%s.%N)
  {
    echo
    echo "\$ $command"
    script -qefc "stty cols 80 rows 40; ${command/spectool/python -m spectool}" /dev/null | tr -d '\r'
  } >> "$transcript" 2>&1
  printf '[%.1f s]\n' "$(echo "$(date +%s.%N) - $start" | bc)" >> "$transcript"
done
rm -rf "$work"
echo "wrote $transcript"
