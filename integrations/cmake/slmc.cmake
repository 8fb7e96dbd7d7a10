# slmc for CMake: include(slmc.cmake), then
#
#   slmc_add_model(NAME <target> CONFIG <slmc.toml> PLATFORM <android|ios|host> [JOBS <n>])
#
# makes <target>, a custom target that runs `slmc build --platform <platform>` when slmc.toml
# or any model/calibration file it names changed (slmc writes a depfile listing them), and
# not otherwise. The artifacts land where slmc.toml's [platforms.<platform>] out says; the
# variable <target>_SLMC_STAMP names the file touched on success, for DEPENDS elsewhere.
# The slmc executable: SLMC_COMMAND (a cache variable; default: `slmc` on PATH).
# Needs CMake >= 3.20 with Makefiles (depfiles of custom commands), any version with Ninja.

find_program(SLMC_COMMAND slmc DOC "the slmc command line")

function(slmc_add_model)
  cmake_parse_arguments(ARG "" "NAME;CONFIG;PLATFORM;JOBS" "" ${ARGN})
  foreach(req NAME CONFIG PLATFORM)
    if(NOT ARG_${req})
      message(FATAL_ERROR "slmc_add_model: ${req} is required")
    endif()
  endforeach()
  if(NOT SLMC_COMMAND)
    message(FATAL_ERROR "slmc_add_model: no slmc command found; pip install slmc or set SLMC_COMMAND")
  endif()
  if(NOT ARG_JOBS)
    set(ARG_JOBS 1)
  endif()
  get_filename_component(config "${ARG_CONFIG}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  set(dir "${CMAKE_CURRENT_BINARY_DIR}/slmc")
  set(stamp "${dir}/${ARG_NAME}.stamp")
  set(depfile "${dir}/${ARG_NAME}.d")
  add_custom_command(
    OUTPUT "${stamp}"
    COMMAND ${SLMC_COMMAND} build --config "${config}" --platform "${ARG_PLATFORM}" --jobs "${ARG_JOBS}"
            --depfile "${depfile}" --stamp "${stamp}"
    DEPENDS "${config}"
    DEPFILE "${depfile}"
    WORKING_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}"
    COMMENT "slmc build --platform ${ARG_PLATFORM} (${ARG_NAME})"
    VERBATIM)
  add_custom_target(${ARG_NAME} ALL DEPENDS "${stamp}")
  set(${ARG_NAME}_SLMC_STAMP "${stamp}" PARENT_SCOPE)
endfunction()
