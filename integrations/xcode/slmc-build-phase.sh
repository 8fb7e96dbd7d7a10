#!/bin/sh
# slmc for Xcode: a Run Script build phase (before "Copy Bundle Resources" is fine, it writes
# straight into the bundle). In the phase:   "${SRCROOT}/path/to/slmc-build-phase.sh"
# Input Files: $(SRCROOT)/slmc.toml   Output Files: $(DERIVED_FILE_DIR)/slmc.stamp
#
# Runs `slmc build --platform ios` and places each artifact folder (.mlpackage or .pte, with
# its tokenizer and manifest.json) in the app bundle's resources:
#   $TARGET_BUILD_DIR/$UNLOCALIZED_RESOURCES_FOLDER_PATH/<artifact name>/
# Settings (environment / build settings): SLMC_CONFIG (default $SRCROOT/slmc.toml),
# SLMC (the command, default: slmc on PATH), SLMC_PLATFORM (default ios; macosx builds can
# use host). Xcode reads the depfile ($DERIVED_FILE_DIR/slmc.d) when the phase names it in
# "Discovered Dependency File", so a changed model reruns the phase.
set -eu

: "${SRCROOT:?run from an Xcode build phase (SRCROOT is not set)}"
: "${TARGET_BUILD_DIR:?run from an Xcode build phase (TARGET_BUILD_DIR is not set)}"
: "${UNLOCALIZED_RESOURCES_FOLDER_PATH:?run from an Xcode build phase (UNLOCALIZED_RESOURCES_FOLDER_PATH is not set)}"
config="${SLMC_CONFIG:-$SRCROOT/slmc.toml}"
platform="${SLMC_PLATFORM:-ios}"
derived="${DERIVED_FILE_DIR:-$TARGET_BUILD_DIR/slmc}"
case "${PLATFORM_NAME:-iphoneos}" in
  iphoneos|iphonesimulator|macosx|xros|xrsimulator) ;;
  *) echo "error: slmc: platform ${PLATFORM_NAME} is not one slmc builds for (iphoneos, iphonesimulator, macosx)" >&2
     exit 2 ;;
esac
mkdir -p "$derived"
# ${SLMC} may be a command with arguments (e.g. "python3 -m slmc.cli"): split on purpose
# shellcheck disable=SC2086
exec ${SLMC:-slmc} build --config "$config" --platform "$platform" \
  --out "$TARGET_BUILD_DIR/$UNLOCALIZED_RESOURCES_FOLDER_PATH" \
  --depfile "$derived/slmc.d" --stamp "$derived/slmc.stamp"
