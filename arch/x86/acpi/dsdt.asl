/*
 * kiln's DSDT: the machine of docs/MACHINE.md described in ASL. Compiled by iasl at build time and
 * embedded into kiln_acpi; write_acpi_tables() copies it into guest memory unchanged.
 *
 * The DSDT is the same for every VM configuration (vCPUs and PCI presence are described by the MADT
 * and the MCFG, which kiln builds at run time), so nothing here may depend on the configuration.
 */
DefinitionBlock ("", "DSDT", 2, "KILN  ", "KILNDSDT", 0x00000001)
{
    /*
     * S5 (soft off): SLP_TYP 5 for both PM1a and PM1b control blocks. kiln's PM1a control
     * register powers the machine off when SLP_TYP 5 is written with SLP_EN (docs/MACHINE.md).
     */
    Name (_S5, Package (0x04) { 0x05, 0x05, 0x00, 0x00 })

    Scope (_SB)
    {
        /* The PCI Express host bridge: configuration mechanism #1 always, ECAM when the MCFG exists. */
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A08"))
            Name (_CID, EisaId ("PNP0A03"))
            Name (_SEG, Zero)
            Name (_BBN, Zero)
            Name (_UID, Zero)

            Name (_CRS, ResourceTemplate ()
            {
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                    0x0000, 0x0000, 0x00FF, 0x0000, 0x0100)
                /* Configuration mechanism #1 is consumed by the bridge itself. */
                IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
                /* PCI I/O window. */
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0x1000, 0xFFFF, 0x0000, 0xF000)
                /* PCI 32-bit MMIO window 0xC000_0000-0xDFFF_FFFF. */
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                    0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000)
                /* PCI 64-bit MMIO window: 64 GiB at 512 GiB. */
                QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,
                    0x0000000000000000, 0x0000008000000000, 0x0000008FFFFFFFFF, 0x0000000000000000,
                    0x0000001000000000)
            })

            /*
             * kiln has no firmware that could own native PCIe hot plug, PME, AER or the PCIe
             * capability structure, so every control the OS requests for this bridge is granted
             * (the capabilities buffer is returned unchanged).
             */
            Method (_OSC, 4, NotSerialized)
            {
                CreateDWordField (Arg3, Zero, CDW1)
                If ((Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766")))
                {
                    If ((Arg1 != One))
                    {
                        CDW1 |= 0x08  /* Unrecognized revision */
                    }
                }
                Else
                {
                    CDW1 |= 0x04  /* Unrecognized UUID */
                }
                Return (Arg3)
            }
        }

        /*
         * Motherboard resources. Linux only trusts the MCFG's ECAM range if it is reserved here; the
         * ACPI I/O ports (PM1 blocks, reset register) and the debug exit port are claimed as well so
         * no driver or PCI BAR is ever placed on them.
         */
        Device (MBRS)
        {
            Name (_HID, EisaId ("PNP0C02"))
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000)
                IO (Decode16, 0x0600, 0x0600, 0x01, 0x10)
                IO (Decode16, 0x0501, 0x0501, 0x01, 0x01)
            })
        }

        /* COM1: 16550 UART. */
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, One)
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
                IRQNoFlags () {4}
            })
        }

        /* i8042 keyboard controller (kiln uses it for its reset line; there is no mouse port). */
        Device (PS2K)
        {
            Name (_HID, EisaId ("PNP0303"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0060, 0x0060, 0x01, 0x01)
                IO (Decode16, 0x0064, 0x0064, 0x01, 0x01)
                IRQNoFlags () {1}
            })
        }

        /* CMOS real-time clock. */
        Device (RTC)
        {
            Name (_HID, EisaId ("PNP0B00"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0070, 0x0070, 0x01, 0x02)
                IRQNoFlags () {8}
            })
        }
    }
}
