// A tiny test harness (no dependency): TEST(name) registers a function, CHECK* record failures
// and go on, main() runs the tests its arguments select (main.cpp) and exits non-zero on any
// failure.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace shadowkv_test {

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failure_count() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void report(const char* file, int line, const std::string& what) {
  ++failure_count();
  std::fprintf(stderr, "%s:%d: FAILED %s\n", file, line, what.c_str());
}

// Runs `f`, expecting std::invalid_argument whose message contains `needle`.
template <typename F>
void check_throws(F&& f, const std::string& needle, const char* expr, const char* file, int line) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find(needle) == std::string::npos)
      report(file, line, std::string(expr) + " threw \"" + e.what() + "\", which does not mention \"" + needle + "\"");
    return;
  } catch (const std::exception& e) {
    report(file, line, std::string(expr) + " threw a non-invalid_argument: " + e.what());
    return;
  }
  report(file, line, std::string(expr) + " did not throw (expected \"" + needle + "\")");
}

}  // namespace shadowkv_test

#define SKV_CAT2(a, b) a##b
#define SKV_CAT(a, b) SKV_CAT2(a, b)
#define TEST(name)                                                                          \
  static void name();                                                                       \
  static const ::shadowkv_test::Register SKV_CAT(register_, name)(#name, name);             \
  static void name()

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) ::shadowkv_test::report(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

// |a - b| <= atol + rtol * |b|; NaN never passes.
#define CHECK_CLOSE(a, b, atol, rtol)                                                                         \
  do {                                                                                                        \
    const double skv_a = (a), skv_b = (b);                                                                    \
    if (!(std::fabs(skv_a - skv_b) <= (atol) + (rtol) * std::fabs(skv_b)))                                    \
      ::shadowkv_test::report(__FILE__, __LINE__,                                                             \
                              "CHECK_CLOSE(" #a ", " #b "): " + std::to_string(skv_a) + " vs " + std::to_string(skv_b)); \
  } while (0)

#define CHECK_THROWS(expr, needle) \
  ::shadowkv_test::check_throws([&] { expr; }, needle, #expr, __FILE__, __LINE__)
