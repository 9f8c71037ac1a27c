// The first end-to-end test: proves the path to a real KVM. Creates a VM through kiln's hv layer,
// runs a few real-mode instructions that write a line to the COM1 port and halt, and checks
// what came out. Runs inside tools/kvm-sandbox (nested KVM on hosts without /dev/kvm).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "hv/kvm.h"
#include "memory/guest_memory.h"

namespace kiln {
namespace {

constexpr uint64_t kCodeAddress = 0x1000;
constexpr uint16_t kCom1 = 0x3f8;

// mov dx, 0x3f8; then for each byte: mov al, imm8; out dx, al; finally: hlt.
std::vector<uint8_t> serial_writer(const std::string& text) {
  std::vector<uint8_t> code = {0xba, kCom1 & 0xff, kCom1 >> 8};
  for (char c : text) code.insert(code.end(), {0xb0, uint8_t(c), 0xee});
  code.push_back(0xf4);
  return code;
}

TEST(KvmSmoke, GuestWritesToSerialPortAndHalts) {
  hv::Kvm kvm = hv::Kvm::open();
  kvm.require_capabilities();
  auto vm = hv::Vm::create(kvm);
  auto memory = memory::GuestMemory::create_ram(1 << 20);
  const auto& region = memory.regions().at(0);
  vm->map_memory(0, region.gpa, region.size, region.host);
  const std::string text = "Hello from a KVM guest\n";
  auto code = serial_writer(text);
  ASSERT_TRUE(memory.write(kCodeAddress, code));

  auto vcpu = vm->create_vcpu(0);
  vcpu->set_real_mode_entry(kCodeAddress);
  std::string output;
  for (int exits = 0; exits < 1000; ++exits) {
    hv::VcpuExit exit = vcpu->run();
    if (exit.kind == hv::VcpuExit::Kind::kHalt) break;
    ASSERT_EQ(exit.kind, hv::VcpuExit::Kind::kIo) << vcpu->describe_registers();
    EXPECT_TRUE(exit.is_write);
    EXPECT_EQ(exit.address, kCom1);
    ASSERT_EQ(exit.size, 1u);
    output.append(exit.data.begin(), exit.data.end());
  }
  EXPECT_EQ(output, text);
}

TEST(KvmSmoke, MissingDeviceNodeGivesAClearError) {
  try {
    hv::Kvm::open("/nonexistent/kvm");
    FAIL() << "opening a missing device succeeded";
  } catch (const hv::HvError& e) {
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
