#!/usr/bin/env bash
# What an expert scripts by hand for IBKR's nightly drop, with OpenSSH's sftp and the gpg binary:
# list the folder, keep the names not seen before, get them in one batch, decrypt them with one
# gpg, and file each plaintext under <account>/<year of period end>/ like ibkr-statements does.
#
# Usage: reference.sh STATE_DIR
#   STATE_DIR/seen.txt   names fetched before, sorted (LC_ALL=C); created when missing
#   STATE_DIR/<account>/<year>/<name>.xml, STATE_DIR/encrypted/<name>.pgp   the archive
# Settings (the benchmark exports them):
#   REF_REMOTE           user@host
#   REF_SSH_OPTIONS      options for sftp, one per line (-P port -i key -c cipher -o ...)
#   REF_REMOTE_DIR       the remote folder
#   REF_GNUPGHOME        the GnuPG home with the secret key
#   REF_PASSPHRASE_FILE  the key's passphrase, in a 0600 file
set -euo pipefail
export LC_ALL=C
cd "$1"
mapfile -t ssh_options <<<"$REF_SSH_OPTIONS"
touch seen.txt
rm -rf incoming
mkdir incoming

# 1. One listing; the reports not seen before.
printf 'cd "%s"\nls -1\n' "$REF_REMOTE_DIR" >list.batch
sftp -q -b list.batch "${ssh_options[@]}" "$REF_REMOTE" >listing.txt
{ grep -v '^sftp> ' listing.txt || true; } | { grep -E '\.(pgp|gpg|asc)$' || true; } \
  | sort >remote.txt
comm -23 remote.txt seen.txt >new.txt
if [ ! -s new.txt ]; then
  echo "nothing new ($(wc -l <remote.txt) listed)"
  exit 0
fi

# 2. One sftp session gets them all.
{
  printf 'cd "%s"\nlcd incoming\n' "$REF_REMOTE_DIR"
  sed 's/.*/get "&"/' new.txt
} >get.batch
sftp -q -b get.batch "${ssh_options[@]}" "$REF_REMOTE" >/dev/null

# 3. One gpg decrypts them all (NAME.xml.pgp -> NAME.xml).
(cd incoming && xargs -d '\n' gpg --homedir "$REF_GNUPGHOME" --batch --quiet --no-tty \
  --pinentry-mode loopback --passphrase-file "$REF_PASSPHRASE_FILE" --decrypt-files <../new.txt)

# 4. File each plaintext under <account>/<year>/: one mv per folder, not per file.
declare -A folders=()
while IFS= read -r name; do
  plain=${name%.*}
  IFS=. read -r account _query _from to _ext <<<"$plain"
  folders["$account/${to:0:4}"]+="incoming/$plain"$'\n'
done <new.txt
for folder in "${!folders[@]}"; do
  mkdir -p "$folder"
  printf '%s' "${folders[$folder]}" | xargs -d '\n' mv -t "$folder"
done
mkdir -p encrypted
(cd incoming && xargs -d '\n' mv -t ../encrypted <../new.txt)
sort -m -o seen.txt seen.txt new.txt
rmdir incoming
echo "fetched and archived $(wc -l <new.txt) new ($(wc -l <remote.txt) listed)"
