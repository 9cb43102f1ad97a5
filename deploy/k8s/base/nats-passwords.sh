# Writes the NATS passwords of the relais-nats Secret as nats.conf variables, for nats.conf to
# include: nats-server then reads them from a file, not from its environment, which every
# process started in its container inherits (the preStop hook, `kubectl exec`) and which
# /proc/<pid>/environ and crash dumps show. Run by the `passwords` init container (nats.yaml)
# before the server starts:
#
#   SECRET_DIR      the Secret, mounted read-only: one file per key (<user>-password)
#   PASSWORDS_FILE  where to write them: on a memory-backed volume that the nats container
#                   mounts read-only, readable by the server's user alone
#   ROUTE_HOSTS     host:port of each server's cluster port, for the routes (which carry the
#                   route password in their URL)
#
# A password becomes a quoted string (its `\` and `"` escaped), so any one-line value works;
# the route password also goes into URLs, so it is limited to the characters a URL's userinfo
# takes as they are. A missing, empty or multi-line password stops the pod here, naming the
# key, never the value. Written at each start, so a changed Secret applies once the pods
# restart (`kubectl -n relais rollout restart statefulset/nats`).
set -eu

umask 0377 # r-------- for the server's user, like the Secret's own files but for the group

password() {
  file="$SECRET_DIR/$1"
  if [ ! -r "$file" ]; then
    echo "nats-passwords: $1 is not in the relais-nats Secret" >&2
    exit 1
  fi
  # The value without its line ending (as the services read theirs); one line, not empty.
  value=$(tr -d '\r' <"$file")
  case "$value" in
  "" | *"
"*)
    echo "nats-passwords: $1 must be one line, not empty" >&2
    exit 1
    ;;
  esac
  printf '%s' "$value"
}

quoted() {
  printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"
}

route=$(password route-password)
case "$route" in
*[!A-Za-z0-9._~-]*)
  echo "nats-passwords: route-password goes into the routes' URLs: use only A-Z a-z 0-9 . _ ~ -" >&2
  exit 1
  ;;
esac

rm -f "$PASSWORDS_FILE.new"
{
  for user in ingress router delivery bounce admin sys route; do
    # Assigned first: `set -e` stops at a failed substitution only in an assignment.
    value=$(password "$user-password")
    printf '%s_PASSWORD: %s\n' "$(printf '%s' "$user" | tr '[:lower:]' '[:upper:]')" "$(quoted "$value")"
  done
  printf 'ROUTES: ['
  separator=
  for host in $ROUTE_HOSTS; do
    printf '%s "nats://route:%s@%s"' "$separator" "$route" "$host"
    separator=,
  done
  printf ' ]\n'
} >"$PASSWORDS_FILE.new"
mv -f "$PASSWORDS_FILE.new" "$PASSWORDS_FILE"
