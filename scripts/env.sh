# Sourced by scripts/*.sh: activate the project's Python environment, creating it on first use.
# Uses the active virtualenv/conda env if there is one, else ./.venv; installs requirements.txt and the
# project itself (editable, so `import clip2video` and the console scripts work from anywhere) when either
# changed since the last install.
# CLIP2VIDEO_USE_CURRENT_PYTHON=1 skips all of this and uses the python on PATH as it is (an environment
# managed otherwise; the tests, which must not reinstall anything).
if [[ "${CLIP2VIDEO_USE_CURRENT_PYTHON:-}" == 1 ]]; then
  return 0
fi
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[env] creating .venv"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
_stamp="${VIRTUAL_ENV:-${CONDA_PREFIX:-.}}/.clip2video-requirements.sha"
_want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]] || ! python -c "import torch, open_clip, cv2, clip2video" 2>/dev/null; then
  echo "[env] installing requirements (first run takes a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$_want" > "$_stamp"
fi
