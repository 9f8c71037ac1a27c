// kiln-img amend (placeholder replaced below)
#include "img/common.h"
namespace kiln::img {
int cmd_amend(int, char**) { throw UsageError("amend: not implemented yet"); }
}  // namespace kiln::img
