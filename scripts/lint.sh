#!/usr/bin/env bash
# Lint: ruff over the tree, and proof that ruff saw every first-party Python file (a folder a tool treats as
# build output, or an over-broad exclude, would otherwise hide code from the linter without a word).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=${RUFF:-.venv/bin/ruff}
"$RUFF" check .
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  tracked=$(git ls-files --cached --others --exclude-standard '*.py' | sort -u)
else
  tracked=$(find . -name '*.py' -not -path './.venv/*' -not -path './.git/*' | sed 's|^\./||' | sort -u)
fi
seen=$("$RUFF" check --show-files . 2>/dev/null | sed "s|^$(pwd)/||" | sort -u)
missed=$(comm -23 <(echo "$tracked") <(echo "$seen"))
if [ -n "$missed" ]; then
  echo "ruff does not check these Python files (see [tool.ruff] exclude in pyproject.toml):" >&2
  echo "$missed" | sed 's/^/  /' >&2
  exit 1
fi
echo "ruff checked all $(echo "$tracked" | wc -l) Python files" >&2
