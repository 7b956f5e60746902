#!/usr/bin/env bash
# Builds the counter web application as an exploded WAR directory:
#   deploy/examples/counter-app/build.sh OUT_DIR
# OUT_DIR/WEB-INF/{web.xml,classes/} is then deployable as context /counter.
# Needs a JDK (javac) and Tomcat 10.1's servlet-api.jar (SERVLET_API, default
# Debian's tomcat10 location).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
servlet_api="${SERVLET_API:-/usr/share/tomcat10/lib/servlet-api.jar}"
mkdir -p "$out/WEB-INF/classes"
cp -r "$here/src/main/webapp/." "$out/"
javac --release 17 -nowarn -encoding UTF-8 -cp "$servlet_api" -d "$out/WEB-INF/classes" \
  $(find "$here/src/main/java" -name '*.java' | sort)
echo "$out"
