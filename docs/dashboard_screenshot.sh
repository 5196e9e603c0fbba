#!/usr/bin/env bash
# The dashboard screenshot README shows: `locedit dashboard` on a study, photographed by headless Chromium.
#
#   docs/dashboard_screenshot.sh                    # outputs/toy/study -> docs/toy_study/dashboard.png (after
#                                                   # `locedit study recipes/toy.yaml`)
#   docs/dashboard_screenshot.sh STUDY_DIR PNG [PAGE]
#
# Run from the repository root. PAGE is a page of trackio's dashboard: empty for its metrics (the default), media
# (images and tables), reports (markdown), runs. Needs Chromium (Debian: apt-get install -y chromium; or set
# CHROMIUM to another Chromium or Chrome). The dashboard serves 127.0.0.1 only and is stopped at the end.
set -euo pipefail

study=${1:-outputs/toy/study}
png=${2:-docs/toy_study/dashboard.png}
page=${3:-}
python=${PYTHON:-python}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$browser" ]; then
  echo "dashboard_screenshot: no Chromium found: apt-get install -y chromium, or set CHROMIUM" >&2
  exit 2
fi
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

log=$(mktemp)
profile=$(mktemp -d)  # a throwaway browser profile: nothing of the user's, nothing left behind
# `python -m` runs this checkout's locedit, whichever one a `locedit` on the PATH belongs to.
"$python" -m locedit.cli dashboard "$study" --port "$port" --no_browser >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$profile" "$log"' EXIT

# The command prints its one line, with the URL, once it serves.
url=""
for _ in $(seq 600); do
  url=$(grep -o 'http://[^ ]*' "$log" | head -n 1 || true)
  [ -n "$url" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "dashboard_screenshot: the dashboard did not start in 60 s" >&2
  cat "$log" >&2
  exit 1
fi
url=${url/\/\?project=/\/$page?project=}  # the page goes before the query: http://127.0.0.1:P/media?project=...

mkdir -p "$(dirname "$png")"
rm -f "$png"
# The virtual time budget lets the page fetch its runs and draw its plots before the picture is taken.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" --window-size=1400,1000 \
  --virtual-time-budget=10000 --screenshot="$png" "$url" >/dev/null 2>&1
if [ ! -s "$png" ]; then
  echo "dashboard_screenshot: Chromium wrote no screenshot of $url" >&2
  exit 1
fi
echo "dashboard_screenshot: $png ($url)"
