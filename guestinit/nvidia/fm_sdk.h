/* The part of NVIDIA's Fabric Manager SDK (libnvfm) that the service VM's partition
 * service uses: connection, the partition list and its activation (issue #25).
 *
 * Declared by us from the SDK's documentation and checked field by field against its
 * headers, include/nv_fm_types.h and include/nv_fm_agent.h of the SDK as packaged in
 * pexip/os-nvidia-fabricmanager (nvidia-fabricmanager-dev). The layout must be the
 * SDK's: the real libnvfm.so.1 and our stand-in (guestinit/testing/libnvfm_standin.c)
 * both read these structs. Every struct with a version field is versioned as the SDK
 * does: sizeof(struct) | (version << 24).
 */
#ifndef GUESTINIT_FM_SDK_H
#define GUESTINIT_FM_SDK_H

typedef enum {
    FM_ST_SUCCESS = 0,
    FM_ST_BADPARAM = -1,
    FM_ST_GENERIC_ERROR = -2,
    FM_ST_NOT_SUPPORTED = -3,
    FM_ST_UNINITIALIZED = -4,
    FM_ST_TIMEOUT = -5,
    FM_ST_VERSION_MISMATCH = -6,
    FM_ST_IN_USE = -7,
    FM_ST_NOT_CONFIGURED = -8,
    FM_ST_CONNECTION_NOT_VALID = -9,
    FM_ST_NVLINK_ERROR = -10,
} fmReturn_t;

typedef void *fmHandle_t;
typedef unsigned int fmFabricPartitionId_t;

#define FM_MAX_STR_LENGTH 256
#define FM_UUID_BUFFER_SIZE 80
#define FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32
#define FM_MAX_NUM_GPUS 16
#define FM_MAX_NUM_NVSWITCHES 12
#define FM_MAX_FABRIC_PARTITIONS 64
#define FM_MAX_NUM_NVLINK_PORTS 64
#define FM_CMD_PORT_NUMBER 6666
#define FM_PARAM_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((ver) << 24)))

typedef struct {
    unsigned int version;
    char addressInfo[FM_MAX_STR_LENGTH]; /* "a.b.c.d[:port]", or a socket path */
    unsigned int timeoutMs;
    unsigned int addressIsUnixSocket;
} fmConnectParams_t;

typedef struct {
    unsigned int physicalId;
    char uuid[FM_UUID_BUFFER_SIZE];
    char pciBusId[FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    unsigned int numNvLinksAvailable;
    unsigned int maxNumNvLinks;
    unsigned int nvlinkLineRateMBps;
} fmFabricPartitionGpuInfo_t;

typedef struct {
    fmFabricPartitionId_t partitionId;
    unsigned int isActive;
    unsigned int numGpus;
    fmFabricPartitionGpuInfo_t gpuInfo[FM_MAX_NUM_GPUS];
} fmFabricPartitionInfo_t;

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    unsigned int maxNumPartitions;
    fmFabricPartitionInfo_t partitionInfo[FM_MAX_FABRIC_PARTITIONS];
} fmFabricPartitionList_t;

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    fmFabricPartitionId_t partitionIds[FM_MAX_FABRIC_PARTITIONS];
} fmActivatedFabricPartitionList_t;

typedef struct {
    char uuid[FM_UUID_BUFFER_SIZE];
    char pciBusId[FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    unsigned int numPorts;
    unsigned int portNum[FM_MAX_NUM_NVLINK_PORTS];
} fmNvlinkFailedDeviceInfo_t;

typedef struct {
    unsigned int version;
    unsigned int numGpus;
    unsigned int numSwitches;
    fmNvlinkFailedDeviceInfo_t gpuInfo[FM_MAX_NUM_GPUS];
    fmNvlinkFailedDeviceInfo_t switchInfo[FM_MAX_NUM_NVSWITCHES];
} fmNvlinkFailedDevices_t;

typedef struct {
    fmFabricPartitionId_t partitionId;
    unsigned int numGpus;
    unsigned int gpuPhysicalIds[FM_MAX_NUM_GPUS];
} fmUnsupportedFabricPartitionInfo_t;

typedef struct {
    unsigned int version;
    unsigned int numPartitions;
    fmUnsupportedFabricPartitionInfo_t partitionInfo[FM_MAX_FABRIC_PARTITIONS];
} fmUnsupportedFabricPartitionList_t;

fmReturn_t fmLibInit(void);
fmReturn_t fmLibShutdown(void);
fmReturn_t fmConnect(fmConnectParams_t *connectParams, fmHandle_t *pFmHandle);
fmReturn_t fmDisconnect(fmHandle_t pFmHandle);
fmReturn_t fmGetSupportedFabricPartitions(fmHandle_t pFmHandle,
                                          fmFabricPartitionList_t *pFmFabricPartition);
fmReturn_t fmActivateFabricPartition(fmHandle_t pFmHandle, fmFabricPartitionId_t partitionId);
fmReturn_t fmDeactivateFabricPartition(fmHandle_t pFmHandle, fmFabricPartitionId_t partitionId);
fmReturn_t fmSetActivatedFabricPartitions(fmHandle_t pFmHandle,
                                          fmActivatedFabricPartitionList_t *pList);
fmReturn_t fmGetNvlinkFailedDevices(fmHandle_t pFmHandle, fmNvlinkFailedDevices_t *pDevices);
fmReturn_t fmGetUnsupportedFabricPartitions(fmHandle_t pFmHandle,
                                            fmUnsupportedFabricPartitionList_t *pList);

#endif
