// Runs the registered tests whose name starts with argv[1] (all without an argument).
#include <cstdio>
#include <cstring>

#include "harness.h"

int main(int argc, char** argv) {
  const char* prefix = argc > 1 ? argv[1] : "";
  int run = 0;
  for (const auto& t : shadowkv_test::registry()) {
    if (std::strncmp(t.name, prefix, std::strlen(prefix)) != 0) continue;
    const int before = shadowkv_test::failure_count();
    try {
      t.fn();
    } catch (const std::exception& e) {
      shadowkv_test::report(__FILE__, __LINE__, std::string(t.name) + " threw " + e.what());
    }
    std::printf("%-52s %s\n", t.name, shadowkv_test::failure_count() == before ? "ok" : "FAILED");
    ++run;
  }
  if (run == 0) {
    std::fprintf(stderr, "no test matches '%s'\n", prefix);
    return 2;
  }
  std::printf("%d tests, %d failed checks\n", run, shadowkv_test::failure_count());
  return shadowkv_test::failure_count() == 0 ? 0 : 1;
}
