#include <cstdio>
int main() { std::fprintf(stderr, "mixserve-plan: under construction\n"); return 1; }
