set -euo pipefail
python3 "$(dirname "$0")/build_corpus.py" --out data --xz "$@"
