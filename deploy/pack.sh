#!/usr/bin/env bash
# Packs the pipeline's environment for spark-submit --archives (README, "On a cluster"):
#   deploy/pack.sh [OUT]          (default work/pack/dmf-env.tar.gz; Spark keeps file modes only in .tar.gz and .tgz)
# A second venv gets the verified stack and this checkout's package installed, not editable, so that nothing in
# the archive points back into the checkout; venv-pack then makes it relocatable. Executors unpack it and run
# ./environment/bin/python. The interpreter is copied in, but not the base installation's standard library and
# libpython (venv-pack's rule): every host needs the same Python 3.11 at the same path as this machine's.
# pyspark's jars are left out: executors run the cluster's own Spark JVM and import only pyspark's Python side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work/pack/dmf-env.tar.gz}
PACK_VENV=${PACK_VENV:-work/pack/venv}
# Spark unpacks no archive with a link out of it, and a venv's bin/python links to the base interpreter.
if [ -L "$PACK_VENV/bin/python" ]; then rm -rf "$PACK_VENV"; fi
VENV=$PACK_VENV VENV_OPTIONS=--copies EXTRAS= EDITABLE=0 ./deploy/install.sh
echo "==> installing this checkout's pipeline package into $PACK_VENV"
"$PACK_VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps --force-reinstall .
mkdir -p "$(dirname "$OUT")"
venv_pack=${VENV_PACK:-.venv/bin/venv-pack}
partial="$(dirname "$OUT")/.partial-$(basename "$OUT")"  # venv-pack infers the format from the extension
"$venv_pack" --prefix "$PACK_VENV" --output "$partial" --compress-level 1 --force --quiet \
  --exclude "lib/python3.11/site-packages/pyspark/jars/*"
mv "$partial" "$OUT"
echo "==> $OUT ($(du -h "$OUT" | cut -f1)); submit with --archives $OUT#environment"
