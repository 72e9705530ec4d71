// Entry point of the native C++ tests (doctest). Run `ponder_native_tests --help` for options,
// e.g. `-tc="forest*"` to pick test cases or `-s` to print every passing assertion.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
