// Helpers shared by the native tests.
#pragma once

#include <doctest/doctest.h>

#include <exception>
#include <string>

namespace ponder_test {

// Runs `call`, checks that it throws exactly `Exc` (not some other exception) and that `snap()`
// -- a value snapshot of the state under test -- is the same before and after; returns what().
template <typename Exc, typename Snap, typename F>
std::string throws_unchanged(Snap&& snap, F&& call, const char* expr, int line) {
  INFO("line " << line << ": " << expr);
  const auto before = snap();
  bool right_kind = false;
  std::string msg;
  try {
    call();
  } catch (const Exc& e) {
    right_kind = true;
    msg = e.what();
  } catch (const std::exception& e) {
    msg = std::string("(other exception) ") + e.what();
  }
  CHECK_MESSAGE(right_kind, "wrong or no exception: " << msg);
  CHECK_MESSAGE((snap() == before), "the failed call changed the state");
  return msg;
}

}  // namespace ponder_test
