#!/usr/bin/env bash
# The demo until the loopback pipeline demo exists: the whole key set-up an IBKR client does,
# in a throw-away project folder, with throw-away passphrases. Nothing outside that folder changes.
set -euo pipefail
tool=${1:-ibkr-statements}
project=$(mktemp -d -t ibkr-statements-demo.XXXXXX)
echo "Demo: key set-up in a temporary project folder: $project"
export IBKR_STATEMENTS_CONFIG="$project/config/ibkr-statements.toml"
IBKR_SSH_PASSPHRASE=$(head -c 18 /dev/urandom | base64)
IBKR_PGP_PASSPHRASE=$(head -c 18 /dev/urandom | base64)
export IBKR_SSH_PASSPHRASE IBKR_PGP_PASSPHRASE
run() { echo; echo "\$ ibkr-statements $*"; "$tool" "$@"; }
run init
run keys ssh
run keys pgp --name "Demo User" --email demo@example.com
run keys show
run keys export --account-last4 1234 --ip 1.2.3.4
echo
echo "The email to IBKR (headers and body; the two public keys are attached):"
sed -n '/^To:/,/^Thank you/p' "$project/keys/outbox/request.eml" | grep -v '^Content-' | sed 's/^/  /'
gpgconf --homedir "$project/keys/gnupg" --kill gpg-agent 2>/dev/null || true
echo
echo "Done. Everything is in $project (delete it when you have looked)."
