#!/usr/bin/env bash
# Prints line N (1 or 2) of README.md's first ```bash block: the commands the README promises,
# read from the README itself so that CI and the README cannot drift apart.
set -euo pipefail
n=${1:?usage: readme_commands.sh <line number>}
line=$(awk '/^```bash[[:space:]]*$/ { inside = 1; next } inside && /^```/ { exit } inside { print }' \
    "$(dirname "$0")/../README.md" | sed -n "${n}p")
if [ -z "$line" ]; then
    echo "readme_commands.sh: README.md's first bash block has no line $n" >&2
    exit 1
fi
printf '%s\n' "$line"
