#!/bin/sh
# Headless Chromium for tests/catalog/test_report.py (the report screenshot test skips without it).
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
