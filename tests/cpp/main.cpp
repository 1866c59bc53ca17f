// Runs the registered tests selected by the arguments: a test runs when its name starts with one
// of the plain arguments (every test when there is none) and with none of the arguments given
// as "-prefix" (exclusions; ctest entries use them to leave tests out of a sanitizer build).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "harness.h"

int main(int argc, char** argv) {
  std::vector<std::string> include, exclude;
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] == '-') {
      exclude.emplace_back(argv[i] + 1);
    } else {
      include.emplace_back(argv[i]);
    }
  }
  const auto starts = [](const char* name, const std::vector<std::string>& prefixes) {
    for (const std::string& p : prefixes)
      if (std::strncmp(name, p.c_str(), p.size()) == 0) return true;
    return false;
  };
  int run = 0;
  for (const auto& t : shadowkv_test::registry()) {
    if ((!include.empty() && !starts(t.name, include)) || starts(t.name, exclude)) continue;
    const int before = shadowkv_test::failure_count();
    const auto t0 = std::chrono::steady_clock::now();
    try {
      t.fn();
    } catch (const std::exception& e) {
      shadowkv_test::report(__FILE__, __LINE__, std::string(t.name) + " threw " + e.what());
    }
    // Seconds per test: CI's sanitizer stages are budgeted by them.
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-52s %-6s %7.1f s\n", t.name, shadowkv_test::failure_count() == before ? "ok" : "FAILED", secs);
    ++run;
  }
  if (run == 0) {
    std::fprintf(stderr, "no test matches the arguments\n");
    return 2;
  }
  std::printf("%d tests, %d failed checks\n", run, shadowkv_test::failure_count());
  return shadowkv_test::failure_count() == 0 ? 0 : 1;
}
