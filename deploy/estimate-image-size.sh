#!/usr/bin/env bash
# Estimates the size of the deploy/Dockerfile image without Docker (deploy/README.md,
# "Image size"): the runtime stage is the base image + Debian packages + /opt/venv.
#
#   /opt/venv  installed here the way the Dockerfile does it (a venv without pip, the
#              project and its dependencies from PyPI, bytecode compiled), then `du`
#   Debian     Installed-Size of the packages `apt-get install --no-install-recommends
#              espeak-ng tini` adds to bookworm-slim (the list below; needs apt lists)
#   base       python:3.11-slim-bookworm, taken as BASE_MB (default 125; `docker images`
#              shows it where Docker runs)
#
# Needs PyPI; prints uncompressed (as `docker images` shows) and gzip (pull) sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_MB=${BASE_MB:-125}
BASE_GZ_MB=${BASE_GZ_MB:-45}
# espeak-ng and tini with their dependencies that bookworm-slim lacks
APT_PACKAGES="espeak-ng espeak-ng-data libespeak-ng1 libpcaudio0 libsonic0 libpulse0
libasound2 libasound2-data libasyncns0 libdbus-1-3 libsndfile1 libflac12 libogg0 libopus0
libvorbis0a libvorbisenc2 libmp3lame0 libmpg123-0 libx11-6 libx11-data libx11-xcb1 libxcb1
libxau6 libxdmcp6 libbsd0 libmd0 tini"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv --without-pip "$work/venv"
python3 -m pip --python "$work/venv/bin/python" install -q --no-cache-dir \
  --disable-pip-version-check .
venv_kib=$(du -sk "$work/venv" | cut -f1)
venv_gz=$(tar -C "$work/venv" -cf - . | gzip -6 | wc -c)

apt_kib=0
apt_deb=0
for package in $APT_PACKAGES; do
  read -r kib deb < <(apt-cache show --no-all-versions "$package" \
    | awk '/^Installed-Size:/ {i=$2} /^Size:/ {s=$2} END {print i+0, s+0}')
  apt_kib=$((apt_kib + kib))
  apt_deb=$((apt_deb + deb))
done

python3 - "$venv_kib" "$venv_gz" "$apt_kib" "$apt_deb" "$BASE_MB" "$BASE_GZ_MB" <<'PY'
import sys

venv_kib, venv_gz, apt_kib, apt_deb, base_mb, base_gz_mb = map(float, sys.argv[1:])
mb = 1e6
venv, apt = venv_kib * 1024 / mb, apt_kib * 1024 / mb
print(f"/opt/venv            {venv:7.1f} MB  (gzip {venv_gz / mb:6.1f} MB)")
print(f"Debian packages      {apt:7.1f} MB  (debs {apt_deb / mb:6.1f} MB)")
print(f"python:3.11-slim     {base_mb:7.1f} MB  (gzip {base_gz_mb:6.1f} MB, assumed)")
total = venv + apt + base_mb
pull = venv_gz / mb + apt_deb / mb + base_gz_mb
print(f"image                {total:7.1f} MB  (pull ~{pull:5.0f} MB)")
PY
